"""What the demo model's wrong lists get wrong: `describe` (shapes left to right) and
`list_buttons` (labels top to bottom).

    python benchmarks/list_errors.py [--model M] [--n 200] [--seed 2027]

Answers `n` fresh questions of each type (half drawn by each renderer) and sorts every wrong
answer into one kind: a wrong number of items; an item written twice that the picture holds
once (the model named a thing again instead of moving on); the right items in another order;
anything else (a thing named wrong). Prints one table row per type.
"""

import argparse
import re
import tempfile
from collections import Counter
from pathlib import Path

from mm1_mlx.evaluate import evaluate, load_examples
from mm1_mlx.loading import load, model_or_default
from mm1_mlx.train.synth import STYLES, write_eval

TYPES = ("describe", "list_buttons")
KINDS = ("wrong count", "repeats an item", "wrong order", "names a thing wrong")
SEPARATOR = re.compile(r",\s*(?:and\s+)?|\s+and\s+")


def items(answer: str) -> list[str]:
    """'a red circle, a blue square and a green circle' -> its three phrases."""
    return [item.strip().lower() for item in SEPARATOR.split(answer.strip()) if item.strip()]


def error_kind(prediction: str, truth: str) -> str:
    predicted, true = items(prediction), items(truth)
    if len(predicted) != len(true):
        return KINDS[0]
    counts, true_counts = Counter(predicted), Counter(true)
    if any(count > max(true_counts[item], 1) for item, count in counts.items()):
        return KINDS[1]
    return KINDS[2] if counts == true_counts else KINDS[3]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the shipped demo model")
    parser.add_argument("--n", type=int, default=200, help="questions per type")
    parser.add_argument("--seed", type=int, default=2027)
    args = parser.parse_args()
    model, processor = load(model_or_default(args.model))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for offset, style in enumerate(STYLES):
            folder = Path(tmp) / style
            write_eval(folder, args.n // len(STYLES), args.seed * 10 + offset, style)
            examples = [ex for task in TYPES for ex in load_examples(folder / f"{task}.jsonl")]
            results += evaluate(model, processor, examples, max_tokens=32).results
    print(f"| type | right | {' | '.join(KINDS)} |")
    print(f"|---|---|{'---|' * len(KINDS)}")
    for task in TYPES:
        mine = [result for result in results if result.example.task == task]
        wrong = Counter(
            error_kind(result.prediction, result.example.answer)
            for result in mine
            if not result.correct
        )
        cells = [f"{len(mine) - sum(wrong.values())}", *(f"{wrong[kind]}" for kind in KINDS)]
        print(f"| {task} | {' | '.join(cells)} |")
    print(f"\n{args.n // len(STYLES) * len(STYLES)} questions per type")


if __name__ == "__main__":
    main()
