#!/usr/bin/env bash
# Session 5, second batch at the default budget (200 steps, 3,200-row mix), three runs side by side,
# one torch thread each: IA3 seed 0 and Propulsion k=15 seed 1 (text format), and the label format
# (frozen base + Propulsion k=15, seed 0).
cd "$(dirname "$0")/../../../.."
L=bench/results/commonsense_logs/run4
python bench/quality.py --task commonsense --threads 1 --methods ia3 \
   --json bench/results/commonsense_text_long_ia3.json > $L/ia3.log 2>&1 &
python bench/quality.py --task commonsense --threads 1 --methods prop_k15 --first-seed 1 \
   --json bench/results/commonsense_text_long_prop_k15_seed1.json > $L/prop_k15_seed1.log 2>&1 &
python bench/quality.py --task commonsense --threads 1 --methods base prop_k15 --answer-format label \
   --json bench/results/commonsense_label_long.json > $L/label.log 2>&1 &
wait
