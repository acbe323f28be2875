#!/usr/bin/env bash
# Reproduce the demo model from nothing with mm1-mlx's own pipeline:
#   bash train/recipes/demo/build.sh [WORK_DIR] [N_IMAGES]
# Every stage can be interrupted and continued: re-running `mm1-mlx train ... --resume`
# continues exactly where a checkpoint left off.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${1:-demo-work}"
n="${2:-20000}"
mkdir -p "$work"
cp "$here/config.json" "$here/pretrain.toml" "$here/sft.toml" "$work/"
cd "$work"
[ -d data ] || mm1-mlx data synth --out data --n "$n" --seed 1 --eval-per-task 200
[ -d tokenizer ] || mm1-mlx data tokenizer data/captions.jsonl data/interleaved.jsonl \
    data/text.jsonl data/chat.jsonl --out tokenizer
[ -d base ] || mm1-mlx init config.json --tokenizer tokenizer --out base
mm1-mlx train pretrain.toml --resume
mm1-mlx train sft.toml --resume
mm1-mlx eval --model sft $(printf -- "--data %s " data/eval/*.jsonl) --json eval.json
