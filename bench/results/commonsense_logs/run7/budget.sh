#!/bin/bash
# The issue's 45-minute budget: base + the three methods at the chosen rates, one seed, full dev,
# 2 threads, nothing else on the machine. Started with setsid nohup from the repository root.
cd "$(dirname "$0")/../../../.."
date -u; uptime
/usr/bin/time -v python bench/quality.py --task commonsense --methods base prop_k15 ia3 lora \
    --json bench/results/commonsense_text_budget45.json
date -u; uptime
