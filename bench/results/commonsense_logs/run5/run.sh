#!/bin/bash
# Session 6: seed 1 of IA3 and LoRA at CHOSEN_LRS, two runs side by side, one thread each.
cd /work/main
python bench/quality.py --task commonsense --threads 1 --methods ia3 --first-seed 1 \
  --json bench/results/commonsense_text_long_ia3_seed1.json > bench/results/commonsense_logs/run5/ia3_seed1.log 2>&1 &
python bench/quality.py --task commonsense --threads 1 --methods lora --first-seed 1 \
  --json bench/results/commonsense_text_long_lora_seed1.json > bench/results/commonsense_logs/run5/lora_seed1.log 2>&1 &
wait
