"""Where a model's box answers go wrong: teacher-forced coordinates on grounding questions.

    python benchmarks/grounding_probe.py [--model M] [--n 50] [--seed 2026] [--shuffle-image-tokens]

Writes `n` fresh ground_shape and ground_button questions (docs/synthetic-world.md), feeds
each prompt with its true answer and reads, at each of the four coordinates, the number the
model finds most likely given the truth before it. Prints per coordinate the correlation with
the truth and the mean error (0..1000 units): a coordinate uncorrelated with the truth is one
the model does not read from the picture. `--shuffle-image-tokens` feeds each tile's image
tokens in a random order: what the model reads from the tokens' positions in the sequence
rather than from what they hold is lost.
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


def forced_coordinates(
    model, processor, example: EvalExample, shuffle: np.random.Generator | None = None
) -> tuple[list[int], list[int]]:
    """(the answer's coordinates, the model's most likely number at each, given the truth).
    With `shuffle`, each tile's image tokens reach the decoder in a random order."""
    plain, spaced = number_token_ids(processor.tokenizer)
    value_of = {token: value for table in (plain, spaced) for value, token in enumerate(table)}
    prompt = processor.apply_chat_template(example.messages, example.images)
    answer = processor.tokenizer.encode(" " + example.answer, add_special_tokens=False)
    tokens = model.encode_images(mx.array(prompt.tiles))
    if shuffle is not None:
        tokens = mx.stack([tile[mx.array(shuffle.permutation(tile.shape[0]))] for tile in tokens])
    logits = model(mx.array([list(prompt.input_ids) + answer]), image_features=tokens)[0]
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
    parser.add_argument(
        "--shuffle-image-tokens",
        action="store_true",
        help="each tile's image tokens in a random order: a coordinate that survives is read "
        "from what the tokens hold, one that does not from where they sit in the sequence",
    )
    args = parser.parse_args()
    shuffle = np.random.default_rng(args.seed) if args.shuffle_image_tokens else None
    model, processor = load(model_or_default(args.model))
    if number_token_ids(processor.tokenizer) is None:
        raise SystemExit("error: the model's tokenizer has no token per number 0..1000")
    print("| type | n | correlation x1, y1, x2, y2 | mean error x1, y1, x2, y2 |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        write_eval(Path(tmp), args.n, args.seed)
        for task in TASKS:
            pairs = [forced_coordinates(model, processor, example, shuffle)
                     for example in load_examples(Path(tmp) / f"{task}.jsonl")]  # fmt: skip
            truth, guess = (
                np.array([pair[k] for pair in pairs if len(pair[0]) == 4]) for k in (0, 1)
            )
            correlation = [np.corrcoef(truth[:, c], guess[:, c])[0, 1] for c in range(4)]
            error = np.abs(truth - guess).mean(0)
            print(f"| {task} | {len(truth)} | {', '.join(f'{c:.2f}' for c in correlation)} | "
                  f"{', '.join(f'{e:.0f}' for e in error)} |")  # fmt: skip
    flag = " --shuffle-image-tokens" if args.shuffle_image_tokens else ""
    print(f"\ncommand: python benchmarks/grounding_probe.py --n {args.n} --seed {args.seed}{flag}")


if __name__ == "__main__":
    main()
