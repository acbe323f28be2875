"""Where a model's box answers go wrong: teacher-forced coordinates on grounding questions.

    python benchmarks/grounding_probe.py [--model M] [--n 50] [--seed 2026]

Writes `n` fresh ground_shape and ground_button questions (docs/synthetic-world.md), feeds
each prompt with its true answer and reads, at each of the four coordinates, the number the
model finds most likely given the truth before it. Prints per coordinate the correlation with
the truth and the mean error (0..1000 units): a coordinate uncorrelated with the truth is one
the model does not read from the picture.
"""

import argparse
import tempfile
from pathlib import Path

import mm1_mlx  # noqa: F401  (first: it loads OpenBLAS, which must precede mlx.core)

# isort: split
import mlx.core as mx
import numpy as np

from mm1_mlx.evaluate import EvalExample, load_examples
from mm1_mlx.loading import load, model_or_default
from mm1_mlx.train.synth import write_eval
from mm1_mlx.train.tokenizer import number_token_ids

TASKS = ("ground_shape", "ground_button")


def forced_coordinates(model, processor, example: EvalExample) -> tuple[list[int], list[int]]:
    """(the answer's coordinates, the model's most likely number at each, given the truth)."""
    plain, spaced = number_token_ids(processor.tokenizer)
    value_of = {token: value for table in (plain, spaced) for value, token in enumerate(table)}
    prompt = processor.apply_chat_template(example.messages, example.images)
    answer = processor.tokenizer.encode(" " + example.answer, add_special_tokens=False)
    pixels = None if prompt.tiles is None else mx.array(prompt.tiles)
    logits = model(mx.array([list(prompt.input_ids) + answer]), pixels)[0]
    truth, guess = [], []
    for index, token in enumerate(answer):
        if token in value_of:
            table = mx.array(spaced if truth else plain)  # the first follows "[" directly
            row = logits[len(prompt.input_ids) + index - 1]
            guess.append(int(mx.argmax(row[table]).item()))
            truth.append(value_of[token])
    return truth, guess


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the shipped demo model")
    parser.add_argument("--n", type=int, default=50, help="questions per grounding type")
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args()
    model, processor = load(model_or_default(args.model))
    if number_token_ids(processor.tokenizer) is None:
        raise SystemExit("error: the model's tokenizer has no token per number 0..1000")
    print("| type | n | correlation x1, y1, x2, y2 | mean error x1, y1, x2, y2 |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        write_eval(Path(tmp), args.n, args.seed)
        for task in TASKS:
            pairs = [forced_coordinates(model, processor, example)
                     for example in load_examples(Path(tmp) / f"{task}.jsonl")]  # fmt: skip
            truth, guess = (
                np.array([pair[k] for pair in pairs if len(pair[0]) == 4]) for k in (0, 1)
            )
            correlation = [np.corrcoef(truth[:, c], guess[:, c])[0, 1] for c in range(4)]
            error = np.abs(truth - guess).mean(0)
            print(f"| {task} | {len(truth)} | {', '.join(f'{c:.2f}' for c in correlation)} | "
                  f"{', '.join(f'{e:.0f}' for e in error)} |")  # fmt: skip
    print(f"\ncommand: python benchmarks/grounding_probe.py --n {args.n} --seed {args.seed}")


if __name__ == "__main__":
    main()
