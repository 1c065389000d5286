#!/bin/bash
cd /work/fresh
for round in 1 2; do
  for which in old new; do
    rm -rf /tmp/online_ab
    if [ $which = new ]; then export PYTHONPATH=/work/main; else unset PYTHONPATH; fi
    OMP_NUM_THREADS=1 /usr/bin/time -f "$which round$round wall %e s user %U sys %S maxrss %M KB minflt %R" .venv/bin/exoalign train --config exoalign-demo/runs/online-exo_bpi1/config.yaml train.output_dir=/tmp/online_ab > /tmp/online_ab_$which$round.log 2>&1
    tail -1 /tmp/online_ab_$which$round.log
    grep -c "" /dev/null
  done
done
uptime
