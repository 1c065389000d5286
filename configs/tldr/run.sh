#!/usr/bin/env bash
# Reproduce the EXO paper's TL;DR summarisation experiment (Ji et al. 2024, §5.2) from the repository root, on a GPU
# machine with access to the Hugging Face hub:   bash configs/tldr/run.sh
# Every stage resumes when rerun after an interruption. tests/test_repro_configs.py runs these exact lines
# with tiny local models and data swapped in.
set -euo pipefail
python configs/tldr/prepare.py --out data/tldr
exoalign sft --config configs/tldr/sft.yaml
exoalign rm train --config configs/tldr/rm.yaml
exoalign sample --config configs/tldr/sample.yaml
exoalign score --config configs/tldr/score.yaml
exoalign train --config configs/tldr/exo_rw.yaml
exoalign train --config configs/tldr/dpo_rw.yaml
exoalign train --config configs/tldr/exo_pref.yaml
exoalign train --config configs/tldr/dpo_pref.yaml
exoalign eval --config configs/tldr/eval.yaml
exoalign plot frontier results/tldr/eval.json --output results/tldr/frontier.png --title "TL;DR: reward vs KL"
