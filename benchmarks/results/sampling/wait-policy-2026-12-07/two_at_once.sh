#!/bin/bash
# Two 2-thread bf16 sampler runs at once (4 threads on the 2 cores), per wait setting.
# Run from the repository root: benchmarks/results/sampling/wait-policy-2026-12-07/two_at_once.sh
for pol in "OMP_WAIT_POLICY=PASSIVE" "GOMP_SPINCOUNT=30000" "GOMP_SPINCOUNT=3000" "OMP_WAIT_POLICY=ACTIVE"; do
  for j in a b; do
    (env $pol python benchmarks/throughput_sampling.py --systems exoalign 2>&1 | grep '^{"exoalign' \
     | python3 -c "import sys,json; print('$pol $j', ' '.join('%s %.2f' % (k, v['seconds']) for l in sys.stdin for k, v in json.loads(l).items()))") &
  done
  wait
done
