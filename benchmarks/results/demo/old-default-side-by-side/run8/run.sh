#!/bin/bash
# Old default settings: 210f5cf, this commit (new), 83b3b9a (before), new, before, back to back; nothing else running.
set -x
export OMP_WAIT_POLICY=PASSIVE
cd /work/sbs12
S='methods=[exo-rw,dpo-rw,exo-pref,dpo-pref] beta_pi=[0.1,1.0] n_train_prompts=72 align_steps=8 align_batch_size=2 align_lr=3e-5 save_every=8 online_rounds=8'
uptime
/usr/bin/time -f "old wall %e s" env PYTHONPATH=/work/wt/old /work/main/.venv/bin/python -m exoalign demo --out /work/sbs12/old > old.log 2>&1
tail -1 old.log; uptime
for r in 1 2; do
/usr/bin/time -f "new$r wall %e s" /work/main/.venv/bin/exoalign demo "methods=[exo-rw,dpo-rw,exo-pref,dpo-pref]" "beta_pi=[0.1,1.0]" n_train_prompts=72 align_steps=8 align_batch_size=2 align_lr=3e-5 save_every=8 online_rounds=8 --out /work/sbs12/new$r > new$r.log 2>&1
tail -1 new$r.log; uptime
/usr/bin/time -f "before$r wall %e s" env PYTHONPATH=/work/wt/head /work/main/.venv/bin/python -m exoalign demo "methods=[exo-rw,dpo-rw,exo-pref,dpo-pref]" "beta_pi=[0.1,1.0]" n_train_prompts=72 align_steps=8 align_batch_size=2 align_lr=3e-5 save_every=8 online_rounds=8 --out /work/sbs12/before$r > before$r.log 2>&1
tail -1 before$r.log; uptime
done
