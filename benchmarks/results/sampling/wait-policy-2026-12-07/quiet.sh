#!/bin/bash
# The sampler (bf16 copy and fp32) under three OpenMP wait settings, alternating, alone on the machine.
# Run from the repository root: benchmarks/results/sampling/wait-policy-2026-12-07/quiet.sh
for i in 1 2; do
  for pol in "OMP_WAIT_POLICY=PASSIVE" "OMP_WAIT_POLICY=ACTIVE" "GOMP_SPINCOUNT=30000"; do
    r=$(env $pol python benchmarks/throughput_sampling.py --systems exoalign,exoalign_fp32 2>&1 | grep '^{"exoalign' \
        | python3 -c "import sys,json; print(' '.join('%s %.2f' % (k, v['seconds']) for l in sys.stdin for k, v in json.loads(l).items()))")
    echo "$pol $i: $r load $(cut -d' ' -f1 /proc/loadavg)"
  done
done
