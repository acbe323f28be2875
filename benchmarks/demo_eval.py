"""Held-out accuracy of the demo model on freshly generated examples of every question type.

    python benchmarks/demo_eval.py [--model M] [--n 200] [--seed 2026] [--json out.json]

Writes `n` new examples per question type from seeds the training data never used (half drawn
by the `plain` renderer, half by `alt`, see docs/synthetic-world.md), answers them greedily and
prints per type the accuracy on each renderer and on both, as the README's table quotes it;
then on `n / 2` more drawn by an independent implementation of the same specification
(benchmarks/spec_renderer.py), pictures whose pixels no training image shares.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import spec_renderer

from mm1_mlx.evaluate import evaluate, load_examples
from mm1_mlx.loading import load, model_or_default
from mm1_mlx.train.synth import STYLES, TASKS, write_eval


def score(model, processor, folder: Path) -> dict[str, tuple[int, int]]:
    """Per task: (correct, n)."""
    examples = [example for task in TASKS for example in load_examples(folder / f"{task}.jsonl")]
    report = evaluate(model, processor, examples, max_tokens=32)
    return {task: (s.correct, s.n) for task, s in report.scores().items()}


INDEPENDENT = "independent"  # benchmarks/spec_renderer.py's pictures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the shipped demo model")
    parser.add_argument("--n", type=int, default=200, help="examples per question type")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    model, processor = load(model_or_default(args.model))
    start = time.perf_counter()
    by_style = {}
    with tempfile.TemporaryDirectory() as tmp:
        for offset, style in enumerate(STYLES):
            folder = Path(tmp) / style
            write_eval(folder, args.n // len(STYLES), args.seed * 10 + offset, style)
            by_style[style] = score(model, processor, folder)
        folder = Path(tmp) / INDEPENDENT
        spec_renderer.write_eval(folder, args.n // len(STYLES), args.seed)
        by_style[INDEPENDENT] = score(model, processor, folder)
    print(f"| type | {' | '.join(STYLES)} | both | {INDEPENDENT} |")
    print(f"|---|{'---|' * len(STYLES)}---|---|")
    report = {}
    for task in TASKS:
        cells = [by_style[style][task] for style in STYLES]
        both = (sum(c for c, _ in cells), sum(n for _, n in cells))
        report[task] = {
            style: dict(zip(("correct", "n"), scores[task], strict=True))
            for style, scores in by_style.items()
        }
        shown = [f"{c / n:.1%}" for c, n in [*cells, both, by_style[INDEPENDENT][task]]]
        print(f"| {task} | {' | '.join(shown)} |")
    print(f"\n{len(TASKS)} types x {args.n} examples in {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
