"""What the demo model's wrong answers are: lists, and questions about one thing.

    python benchmarks/answer_errors.py [--model M] [--n 200] [--seed 2027]

Answers `n` fresh questions of each type below, half drawn by each renderer, and sorts every
wrong answer into one kind. Prints one table per group of types:
- the lists, `describe` (shapes left to right) and `list_buttons` (labels top to bottom): a
  wrong number of items; an item written twice that the picture holds once (the model named a
  thing again instead of moving on); the right items in another order; anything else (a thing
  named wrong);
- the questions about one thing, `color` ("What color is the {kind}?"), `refer_shape` and
  `refer_button` ("What is at [box]?"): the answer about another thing of the same picture
  (the model found the wrong thing), or one about nothing there (it misread);
- `count_kind`: a kind that is absent counted as present, a present kind counted too low, or
  too high.
"""

import argparse
import random
import re
import tempfile
from collections import Counter
from pathlib import Path

from mm1_mlx.evaluate import evaluate, is_correct, load_examples
from mm1_mlx.generate import generate
from mm1_mlx.loading import load, model_or_default
from mm1_mlx.train import synth

LIST_TYPES = ("describe", "list_buttons")
KINDS = ("wrong count", "repeats an item", "wrong order", "names a thing wrong")
LOOKUP_TYPES = ("color", "refer_shape", "refer_button")
LOOKUP_KINDS = ("another thing's", "nothing's")
COUNT_KINDS = ("absent, counted", "present, too few", "present, too many")
SEPARATOR = re.compile(r",\s*(?:and\s+)?|\s+and\s+")


def items(answer: str) -> list[str]:
    """'a red circle, a blue square and a green circle' -> its three phrases."""
    return [item.strip().lower() for item in SEPARATOR.split(answer.strip()) if item.strip()]


def error_kind(prediction: str, truth: str) -> str:
    """What a wrong list got wrong."""
    predicted, true = items(prediction), items(truth)
    if len(predicted) != len(true):
        return KINDS[0]
    counts, true_counts = Counter(predicted), Counter(true)
    if any(count > max(true_counts[item], 1) for item, count in counts.items()):
        return KINDS[1]
    return KINDS[2] if counts == true_counts else KINDS[3]


def answers_in(scene: synth.Scene, task: str) -> set[str]:
    """What `task` would answer about each thing of the scene."""
    if task == "color":
        return {shape.color for shape in scene.shapes}
    if task == "refer_shape":
        return {shape.phrase for shape in scene.shapes}
    return {button.label for button in scene.buttons}


def lookup_error_kind(task: str, scene: synth.Scene, prediction: str, truth: str) -> str:
    """What a wrong answer about one thing (or a wrong count of a kind) got wrong."""
    if task == "count_kind":
        predicted, true = int(prediction) if prediction.isdigit() else -1, int(truth)
        return COUNT_KINDS[0] if true == 0 else COUNT_KINDS[1 if predicted < true else 2]
    return LOOKUP_KINDS[0] if prediction in answers_in(scene, task) - {truth} else LOOKUP_KINDS[1]


def list_errors(model, processor, n: int, seed: int) -> dict[str, tuple[int, Counter]]:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for offset, style in enumerate(synth.STYLES):
            folder = Path(tmp) / style
            synth.write_eval(folder, n // len(synth.STYLES), seed * 10 + offset, style)
            examples = [ex for task in LIST_TYPES for ex in load_examples(folder / f"{task}.jsonl")]
            results += evaluate(model, processor, examples, max_tokens=32).results
    rows = {}
    for task in LIST_TYPES:
        mine = [result for result in results if result.example.task == task]
        wrong = Counter(
            error_kind(result.prediction, result.example.answer)
            for result in mine
            if not result.correct
        )
        rows[task] = (len(mine) - sum(wrong.values()), wrong)
    return rows


def lookup_errors(model, processor, n: int, seed: int) -> dict[str, tuple[int, Counter]]:
    rng = random.Random(f"lookup-{seed}")  # the scenes are needed, so drawn here
    rows = {}
    for task in (*LOOKUP_TYPES, "count_kind"):
        wrong = Counter()
        for i in range(n):
            scenes, qa = synth.eval_example(task, rng)
            image = synth.render(scenes[0], synth.STYLES[i % len(synth.STYLES)], rng)
            messages = [synth.user_turn(qa.question, 1)]
            prediction = generate(model, processor, messages, [image], max_tokens=16).strip()
            if not is_correct(prediction, qa.answer, scenes[0].size):
                wrong[lookup_error_kind(task, scenes[0], prediction, qa.answer)] += 1
        rows[task] = (n - sum(wrong.values()), wrong)
    return rows


def print_table(rows: dict[str, tuple[int, Counter]], kinds: tuple[str, ...]) -> None:
    print(f"\n| type | right | {' | '.join(kinds)} |\n|---|---|{'---|' * len(kinds)}")
    for task, (right, wrong) in rows.items():
        print(f"| {task} | {right} | {' | '.join(str(wrong[kind]) for kind in kinds)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the shipped demo model")
    parser.add_argument("--n", type=int, default=200, help="questions per type (even)")
    parser.add_argument("--seed", type=int, default=2027)
    args = parser.parse_args()
    if args.n < 2 or args.n % 2:
        raise SystemExit("error: --n must be an even number >= 2 (half per renderer)")
    model, processor = load(model_or_default(args.model))
    print_table(list_errors(model, processor, args.n, args.seed), KINDS)
    lookups = lookup_errors(model, processor, args.n, args.seed)
    counts = {"count_kind": lookups.pop("count_kind")}
    print_table(lookups, LOOKUP_KINDS)
    print_table(counts, COUNT_KINDS)
    print(f"\n{args.n} questions per type")


if __name__ == "__main__":
    main()
