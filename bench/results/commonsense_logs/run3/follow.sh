#!/usr/bin/env bash
# Session 5, after the lora stream: more seeds at the same budget as run.sh (no mid-schedule point).
cd "$(dirname "$0")/../../../.."
L=bench/results/commonsense_logs/run3
while pgrep -f "run3/run.sh lora" > /dev/null; do sleep 20; done
for spec in "prop_k15 1" "ia3 1"; do
  set -- $spec
  python bench/quality.py --task commonsense --threads 1 --methods $1 --first-seed $2 --train-rows 3200 --steps 200 \
     --warmup 12 --json bench/results/commonsense_text_long_$1_seed$2.json > $L/$1_seed$2.log 2>&1
done
