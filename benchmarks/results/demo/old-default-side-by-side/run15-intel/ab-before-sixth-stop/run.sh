#!/bin/bash
# Today's demo at the old default settings with the code of the tree $1 (its exoalign/ on PYTHONPATH; REPO: a checkout
# with make test's .venv), output in $2. Run as: run.sh TREE_2e3d201 DIR1; run.sh TREE_99aa573 DIR2 (one after the other).
cd $2
/usr/bin/time -f "wall %e s" env OMP_WAIT_POLICY=PASSIVE PYTHONPATH=$1 $REPO/.venv/bin/python -m exoalign demo "methods=[exo-rw,dpo-rw,exo-pref,dpo-pref]" "beta_pi=[0.1,1.0]" n_train_prompts=72 align_steps=8 align_batch_size=2 align_lr=3e-5 save_every=8 online_rounds=8 --out $2/out > $2/log 2>&1
tail -1 $2/log; uptime
