#!/bin/bash
# The default demo, old code (c025cce-equivalent fresh clone) and new code (PYTHONPATH=/work/main), alternating.
cd /work/fresh
for round in 1 2; do
  for which in old new; do
    rm -rf /tmp/demo_$which
    if [ $which = new ]; then export PYTHONPATH=/work/main; else unset PYTHONPATH; fi
    echo "$which round$round start $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
    /usr/bin/time -f "$which round$round wall %e s user %U sys %S" .venv/bin/exoalign demo --out /tmp/demo_$which > /tmp/demo_${which}_$round.log 2>&1
    tail -1 /tmp/demo_${which}_$round.log
    grep -E "^done in|train \+ eval: done" /tmp/demo_${which}_$round.log
    mkdir -p /work/scratch/demo_ab/${which}_$round && cp /tmp/demo_$which/report.md /tmp/demo_$which/results.json /work/scratch/demo_ab/${which}_$round/ 2>/dev/null
  done
done
echo "end $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
