"""Training throughput of the demo recipe's stages: one process vs `--ranks 2`, side by side.

    python benchmarks/demo_training.py [--images 600] [--steps 8] [--rounds 2] [--tiny]
                                       [--stages dense pretrain sft]

Builds a small copy of the demo recipe's world in a temporary folder (`data synth` with both
seeds, the tokenizer, `init`), then runs each stage as build.sh does, through the CLI, for a
few steps with 1 process (default threads) and with 2 ranks, alternating round by round:
dense pre-training (`train dense.toml`, 32 images a step: images/s), pre-training and SFT
(`train pretrain.toml` / `sft.toml`, from the untrained model: the speed does not depend on the
weights; tokens/s); each the median of a run's steps after the first two (from metrics.jsonl).
Prints each stage's medians and the ratio 2 ranks / 1 process.
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RECIPE = Path(__file__).resolve().parent.parent / "train" / "recipes" / "demo"
SETTINGS = ("1 process", "2 ranks")
STAGES = {
    "dense pre-training (images/s)": "dense",
    "pre-training (tokens/s)": "pretrain",
    "SFT (tokens/s)": "sft",
}


def cli(*args: str, cwd: Path) -> str:
    """Run `mm1-mlx ARGS` in `cwd`; its standard output."""
    result = subprocess.run(
        [sys.executable, "-m", "mm1_mlx", *args], cwd=cwd, capture_output=True, text=True
    )
    if result.returncode:
        raise SystemExit(f"mm1-mlx {' '.join(args)} failed:\n{result.stderr[-2000:]}")
    return result.stdout


def build_world(work: Path, images: int) -> None:
    for name in ("config.json", "dense.toml", "pretrain.toml", "sft.toml"):
        shutil.copy(RECIPE / name, work / name)
    for half, seed in (("data-a", "1"), ("data-b", "2")):
        cli("data", "synth", "--out", half, "--n", str(images), "--seed", seed,
            "--eval-per-task", "0", cwd=work)  # fmt: skip
    files = [f"data-a/{name}.jsonl" for name in ("captions", "interleaved", "text", "chat")]
    cli("data", "tokenizer", *files, "--out", "tokenizer", cwd=work)
    cli("init", "config.json", "--tokenizer", "tokenizer", "--out", "base", "--smooth-numbers",
        cwd=work)  # fmt: skip


def stage_speed(work: Path, stage: str, ranks: int, steps: int) -> float:
    """The median images/s (dense) or tokens/s of `steps` steps after two to warm up."""
    out = work / f"{stage}-{ranks}"
    cli("train", f"{stage}.toml", "--out", str(out), "--ranks", str(ranks),
        "--set", "model=base", "--set", f"train.steps={steps + 2}", "--set", "log.every=1",
        "--set", "log.eval_every=0", "--set", f"checkpoint.every={steps + 2}",
        "--set", "optimizer.warmup_steps=1", cwd=work)  # fmt: skip
    lines = (out / "metrics.jsonl").read_text().splitlines()
    speed = "images_per_s" if stage == "dense" else "tokens_per_s"
    speeds = [json.loads(line)[speed] for line in lines[2:]]
    shutil.rmtree(out)
    return statistics.median(speeds)


def digits(speed: float) -> int:
    """Decimals worth printing: tokens/s in the thousands need none, images/s one."""
    return 0 if speed >= 100 else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=600, help="synthetic images per seed")
    parser.add_argument("--steps", type=int, default=8, help="measured steps per run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="seconds: a smoke test, no result")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--stages", nargs="+", choices=STAGES.values(), default=list(STAGES.values())
    )
    args = parser.parse_args()
    if args.tiny:
        args.images, args.steps, args.rounds = 40, 1, 1
    stages = {stage: recipe for stage, recipe in STAGES.items() if recipe in args.stages}
    results = {stage: {setting: [] for setting in SETTINGS} for stage in stages}
    with tempfile.TemporaryDirectory(prefix="mm1-demo-bench-") as folder:
        work = Path(folder)
        build_world(work, args.images)
        for index in range(args.rounds):  # alternating order
            for stage, recipe in stages.items():
                order = SETTINGS if index % 2 == 0 else SETTINGS[::-1]
                for setting in order:
                    ranks = 1 if setting == "1 process" else 2
                    speed = stage_speed(work, recipe, ranks, args.steps)
                    results[stage][setting].append(speed)
    print(f"| stage | {' | '.join(SETTINGS)} | 2 ranks / 1 process |")
    print("|---|---|---|---|")
    for stage, runs in results.items():
        one, two = (statistics.median(runs[setting]) for setting in SETTINGS)
        print(f"| {stage} | {one:.{digits(one)}f} | {two:.{digits(two)}f} | {two / one:.2f}x |")
    command = f"python benchmarks/demo_training.py --steps {args.steps} --rounds {args.rounds}"
    if args.stages != list(STAGES.values()):
        command += f" --stages {' '.join(args.stages)}"
    print(f"\ncommand: {command}{' --tiny' if args.tiny else ''}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
