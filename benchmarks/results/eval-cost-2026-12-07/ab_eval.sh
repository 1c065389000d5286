#!/bin/bash
# A/B of eval_cost: base (HEAD before) vs new (working tree), alternating
set -e
for i in 1 2; do
  for v in base new; do
    if [ $v = base ]; then root=/work/scratch/s14/base; else root=/work/main; fi
    (cd $root && OMP_NUM_THREADS=1 PYTHONPATH=$root /work/main/.venv/bin/python benchmarks/eval_cost.py --checkpoints 3 --json /work/scratch/s14/eval_${v}_$i.json 2>&1 | grep -E "ratio" )
    echo "== $v $i load $(cat /proc/loadavg)"
  done
done
