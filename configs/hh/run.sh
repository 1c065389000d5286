#!/usr/bin/env bash
# Reproduce the EXO paper's Anthropic-HH helpful-base experiment (Ji et al. 2024, §5.2) from the repository root, on a GPU
# machine with access to the Hugging Face hub:   bash configs/hh/run.sh
# Every stage resumes when rerun after an interruption. tests/test_repro_configs.py runs these exact lines
# with tiny local models and data swapped in.
set -euo pipefail
python configs/hh/prepare.py --out data/hh
exoalign sft --config configs/hh/sft.yaml
exoalign rm train --config configs/hh/rm.yaml
exoalign sample --config configs/hh/sample.yaml
exoalign score --config configs/hh/score.yaml
exoalign train --config configs/hh/exo_rw.yaml
exoalign train --config configs/hh/dpo_rw.yaml
exoalign train --config configs/hh/exo_pref.yaml
exoalign train --config configs/hh/dpo_pref.yaml
exoalign eval --config configs/hh/eval.yaml
exoalign plot frontier results/hh/eval.json --output results/hh/frontier.png --title "Anthropic-HH: reward vs KL"
