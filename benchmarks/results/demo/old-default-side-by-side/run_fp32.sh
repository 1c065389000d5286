#!/bin/bash
# As run.sh, on a CPU without bf16 matmul units (AVX2 only, e.g. AMD EPYC Zen 3): the old code (210f5cf) is told
# mixed_precision=fp32 (its bf16 default multiplies several times slower than fp32 there); today's code runs its
# defaults (auto: fp32 training and fp32 sampling on such a CPU). Same variables as run.sh (REPO, OLD_WORKTREE,
# NEW_TREE, WORK, ORDER).
OLD_ARGS=mixed_precision=fp32 exec bash "$(dirname "$0")/run.sh"
