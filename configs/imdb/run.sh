#!/usr/bin/env bash
# Reproduce the EXO paper's IMDB controlled-sentiment experiment (Ji et al. 2024, §5.1) from the repository
# root, on a GPU machine with access to the Hugging Face hub:   bash configs/imdb/run.sh
# Every stage resumes when rerun after an interruption. tests/test_repro_configs.py runs these exact lines
# with tiny local models and data swapped in.
set -euo pipefail
python configs/imdb/prepare.py --out data/imdb
exoalign sft --config configs/imdb/sft.yaml
exoalign sample --config configs/imdb/sample.yaml
exoalign score --config configs/imdb/score.yaml
exoalign label --config configs/imdb/label.yaml
exoalign train --config configs/imdb/exo_rw.yaml
exoalign train --config configs/imdb/dpo_rw.yaml
exoalign train --config configs/imdb/exo_pref.yaml
exoalign train --config configs/imdb/dpo_pref.yaml
exoalign eval --config configs/imdb/eval.yaml
exoalign plot frontier results/imdb/eval.json --output results/imdb/frontier.png --title "IMDB: reward vs KL"
