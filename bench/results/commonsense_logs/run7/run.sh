#!/bin/bash
# Session 8, from the repository root: the 45-minute budget run alone (budget.sh), then the
# learning-rate grid around each chosen rate (seed 0, 200 steps, the section-2 protocol) in two
# lanes, one torch thread each. The queues, as started (bench/lane.sh consumes them):
#   laneA: ia3 7.5e-3, prop_k15 5e-4      laneB: lora 5e-4, prop_k15 2e-3
# (the step-up runs ia3 3e-2 and lora 2e-3 were queued too, and taken out before they started)
# each line: NAME|python bench/quality.py --task commonsense --threads 1 --methods M --lr M=LR \
#                  --json bench/results/commonsense_grid_M_lrLR.json
D=bench/results/commonsense_logs/run7
setsid nohup bash $D/budget.sh > $D/budget.log 2>&1 < /dev/null &
pid=$!
setsid nohup bash bench/lane.sh $D $D/laneA.q $pid > /dev/null 2>&1 < /dev/null &
setsid nohup bash bench/lane.sh $D $D/laneB.q $pid > /dev/null 2>&1 < /dev/null &
