#!/usr/bin/env bash
# Reproduce the demo model from nothing with mm1-mlx's own pipeline:
#   [RANKS=N] [DENSE_ARGS="..."] bash train/recipes/demo/build.sh [WORK_DIR] [IMAGES_PER_HALF] \
#       [EVAL_PER_TASK] [TRAIN_ARGS...]
# TRAIN_ARGS go to the pre-training and both SFT stages, DENSE_ARGS to the dense stage (the
# tests shorten the run with --set). RANKS: data-parallel ranks of every training stage; on
# Linux's CPU backend 2 (on a 2-core machine 2 ranks train 1.4-1.6x faster than one process:
# benchmarks/demo_training.py), on a Mac 1 (one GPU).
# Every stage can be interrupted and continued: re-running this script (or
# `mm1-mlx train ... --resume`) continues exactly where the last checkpoint left off.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${1:-demo-work}"
n="${2:-12000}"
eval_per_task="${3:-50}"
train_args=("${@:4}")
if [ "$(uname -s)" = Darwin ]; then ranks="${RANKS:-1}"; else ranks="${RANKS:-2}"; fi
mkdir -p "$work"
cp "$here/config.json" "$here/dense.toml" "$here/pretrain.toml" "$here/sft.toml" "$work/"
cd "$work"
# Two seeds in parallel: the generator is single-threaded.
[ -d data-a ] || mm1-mlx data synth --out data-a --n "$n" --seed 1 --eval-per-task "$eval_per_task" &
[ -d data-b ] || mm1-mlx data synth --out data-b --n "$n" --seed 2 --eval-per-task 0 &
wait
[ -d tokenizer ] || mm1-mlx data tokenizer data-a/captions.jsonl data-a/interleaved.jsonl \
    data-a/text.jsonl data-a/chat.jsonl --out tokenizer
[ -d base ] || mm1-mlx init config.json --tokenizer tokenizer --out base --smooth-numbers
# The image encoder first (as MM1 starts from a CLIP encoder): every image token learns what
# lies under it.
# shellcheck disable=SC2086 # DENSE_ARGS is a list of words
mm1-mlx train dense.toml --resume --ranks "$ranks" ${DENSE_ARGS:-}
mm1-mlx train pretrain.toml --resume --ranks "$ranks" "${train_args[@]}"
mm1-mlx train sft.toml --resume --ranks "$ranks" "${train_args[@]}"
# A second, gentler SFT cycle on the same data (a fresh optimizer, a third of the peak learning
# rate): the first cycle stops short of what SFT can reach (README.md, "What each choice bought").
mm1-mlx train sft.toml --resume --ranks "$ranks" --out sft2 --set model=sft \
    --set train.steps=600 --set optimizer.lr=3e-4 --set optimizer.warmup_steps=20 \
    --set optimizer.min_lr_ratio=0.1 "${train_args[@]}"
mm1-mlx eval --model sft2 $(printf -- "--data %s " data-a/eval/*.jsonl) --json eval.json
