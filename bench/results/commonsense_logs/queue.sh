#!/usr/bin/env bash
# The commonsense experiment queue (docs/QUALITY.md): one run after the other, each writing its JSON
# (and a .partial.json after every finished method) under bench/results/. One torch thread: on the
# shared, overloaded 2-core machine two OpenMP threads mostly wait for each other.
cd "$(dirname "$0")/../../.."
run() { echo "== $(date -u +%FT%H:%M:%S) start: $* | $(uptime)"; nice -n 5 python bench/quality.py --task commonsense --threads ${THREADS:-1} "$@";
        echo "== $(date -u +%FT%H:%M:%S) end rc=$? | $(uptime)"; }
run --methods base prop_k15 ia3 lora --answer-format text --json bench/results/commonsense_text_main.json
run --methods prop_all full --answer-format text --json bench/results/commonsense_text_extra.json
run --methods base prop_k15 ia3 lora --answer-format label --json bench/results/commonsense_label_main.json
run --methods prop_k15 ia3 --sweep --seeds 1 --eval-questions 100 --answer-format text --json bench/results/commonsense_text_sweep_subset.json
run --methods prop_k5 prop_k35 prop_attn prop_mlp --eval-questions 100 --answer-format text --json bench/results/commonsense_text_k_targets_subset.json
