#!/bin/bash
# Session 7: after the two lanes, the clean-clone check (README commands + .ci/run), then the
# 45-minute budget run with nothing else on the machine: base, prop_k15, ia3, lora at CHOSEN_LRS,
# both cores, one command (seed 0, then seed 1 of each trained method).
D=/work/main/bench/results/commonsense_logs/run6
while pgrep -f "run6/lane.sh" > /dev/null; do sleep 15; done
bash /tmp/cleanrun_shared.sh > /tmp/cleanrun7.log 2>&1
cd /work/main
echo "$(date -u +%H:%M:%S) start budget load $(cut -d' ' -f1-3 /proc/loadavg)" >> $D/queue.log
python bench/quality.py --task commonsense --methods base prop_k15 ia3 lora --seeds 2 \
  --json bench/results/commonsense_text_budget.json > $D/budget.log 2>&1
echo "$(date -u +%H:%M:%S) end budget rc=$?" >> $D/queue.log
