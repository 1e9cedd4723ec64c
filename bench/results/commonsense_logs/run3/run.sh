#!/usr/bin/env bash
# Session 5: a longer budget (3,200-row mix, 200 steps ~ 1.1 epochs) with a mid-schedule point,
# two runs side by side, one torch thread each.
cd "$(dirname "$0")/../../../.."
L=bench/results/commonsense_logs/run3
for m in "$@"; do
  python bench/quality.py --task commonsense --threads 1 --methods $m --train-rows 3200 --steps 200 --warmup 12 \
     --eval-at 100 --json bench/results/commonsense_text_long_$m.json > $L/$m.log 2>&1
done
