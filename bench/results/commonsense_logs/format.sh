#!/usr/bin/env bash
# Which answer format discriminates: the frozen base in both formats on the first 75 questions of
# each dev file (300 questions), one torch thread (docs/QUALITY.md).
cd "$(dirname "$0")/../../.."
for f in text label; do
  echo "== $f $(date -u +%FT%H:%M:%S) | $(uptime)"
  nice -n 5 python bench/quality.py --task commonsense --threads 1 --methods base --answer-format $f --eval-questions 75 --json bench/results/commonsense_format_base_$f.json
  echo "== end $f rc=$? $(date -u +%FT%H:%M:%S) | $(uptime)"
done
