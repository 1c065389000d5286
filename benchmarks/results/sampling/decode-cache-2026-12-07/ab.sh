#!/bin/bash
# Alternating A/B of one sampler system of benchmarks/throughput_sampling.py (defaults: the demo's shape, 72 prompts
# x K = 4, 24 new tokens, 64 prompts per call, 2 threads), three runs each.
#   OLD=<worktree of the code before> NEW=<the change's tree> SYSTEM=exoalign_fp32 OUT=<dir> PREFIX=fp32 ./ab.sh
set -e
: "${OLD:?a worktree of the code before}" "${NEW:?the change's tree}" "${OUT:?a folder for the JSON}"
SYSTEM="${SYSTEM:-exoalign_fp32}" PREFIX="${PREFIX:-fp32}" PY="${PY:-python}"
for i in 1 2 3; do
  for t in old new; do
    if [ $t = old ]; then d=$OLD; else d=$NEW; fi
    (cd "$d" && PYTHONPATH="$d" OMP_WAIT_POLICY=PASSIVE "$PY" benchmarks/throughput_sampling.py --systems "$SYSTEM" \
      --json "$OUT/${PREFIX}_${t}_$i.json" 2>&1 | grep "\"$SYSTEM\"" | head -1)
    echo "$t $i load $(cut -d' ' -f1-3 /proc/loadavg)"
  done
done
