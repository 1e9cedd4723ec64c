#!/bin/bash
# One lane of runs: waits for PID $2, then pops commands from queue file $1 one at a time (the
# file can be edited while the lane runs), each one thread, logged beside this script.
cd /work/main
Q=$1
while kill -0 "$2" 2>/dev/null; do sleep 20; done
while true; do
  line=$(head -n1 "$Q"); [ -z "$line" ] && break
  sed -i 1d "$Q"
  name=${line%%|*}; cmd=${line#*|}
  echo "$(date -u +%H:%M:%S) start $name" >> bench/results/commonsense_logs/run6/queue.log
  bash -c "$cmd" > "bench/results/commonsense_logs/run6/$name.log" 2>&1
  echo "$(date -u +%H:%M:%S) end $name rc=$?" >> bench/results/commonsense_logs/run6/queue.log
done
