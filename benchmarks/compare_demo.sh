#!/usr/bin/env bash
# The matched-compute comparison of docs/results.md: HRM-Text, Huginn and a Transformer at CPU size,
# each trained on the same reasoning-gym mix for the training FLOPs hrm-text-tiny spends in 200 steps
# of 32 x 64 tokens (6.8e12), then scored on the same 200 held-out samples; three seeds each (~20 min).
#   bash benchmarks/compare_demo.sh [OUT]      (default runs/compare-demo; resumable)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/compare-demo}"
python -m hrmspec compare hrm-text-tiny huginn-tiny transformer \
  --budget flops=6.8e12 --data benchmarks/configs/compare_mix.yaml --out "$OUT" --n 200 --evals 3 --seeds 3 \
  --set train.batch_size=32 --set train.seq_len=64 --set train.lr=3.0e-3 --set train.warmup=0.02 \
  --set train.weight_decay=0.1 --set train.ema=0.995 --set train.max_new_tokens=10 --set train.log_every=25 \
  --set train.save_every=300 --set model.vocab=320 --no-progress
# the tables and the plot of docs/results.md
cp "$OUT/compare.md" benchmarks/results/compare_demo.md
cp "$OUT/compare.png" benchmarks/results/compare_demo.png
