#!/bin/bash
# A lane of bench runs for a long table on a small machine: waits for PID $3 (if given) to end,
# then takes "NAME|COMMAND" lines from queue file $2 one at a time (the file may be edited while
# the lane runs), logging each command to DIR/NAME.log and its start and end to DIR/queue.log.
# Used as: setsid nohup bash bench/lane.sh DIR DIR/laneA.q [PID] &   (from the repository root)
D=$1 Q=$2
cd "$(dirname "$0")/.."
while [ -n "$3" ] && kill -0 "$3" 2>/dev/null; do sleep 20; done
while true; do
  line=$(head -n1 "$Q"); [ -z "$line" ] && break
  sed -i 1d "$Q"
  name=${line%%|*}; cmd=${line#*|}
  echo "$(date -u +%H:%M:%S) start $name load $(cut -d' ' -f1-3 /proc/loadavg)" >> "$D/queue.log"
  bash -c "$cmd" > "$D/$name.log" 2>&1
  echo "$(date -u +%H:%M:%S) end $name rc=$? load $(cut -d' ' -f1-3 /proc/loadavg)" >> "$D/queue.log"
done
