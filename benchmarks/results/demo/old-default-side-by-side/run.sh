#!/bin/bash
# Old (210f5cf) and today's demo at the old default settings, back to back, nothing else running.
# REPO: this checkout (with make test's .venv); OLD_WORKTREE: git worktree add DIR 210f5cf; WORK: an empty directory;
# NEW_TREE: a copy of this checkout's exoalign/ (default REPO itself); ORDER=new-first runs today's code first;
# OLD_ARGS: settings for the old code's demo only (run_fp32.sh passes mixed_precision=fp32).
set -x
export OMP_WAIT_POLICY=PASSIVE
cd $WORK
old() {
  /usr/bin/time -f "old wall %e s" env PYTHONPATH=$OLD_WORKTREE $REPO/.venv/bin/python -m exoalign demo $OLD_ARGS --out $WORK/old > old.log 2>&1
  tail -1 old.log; uptime
}
new() {
  /usr/bin/time -f "new wall %e s" env PYTHONPATH=${NEW_TREE:-$REPO} $REPO/.venv/bin/python -m exoalign demo "methods=[exo-rw,dpo-rw,exo-pref,dpo-pref]" "beta_pi=[0.1,1.0]" n_train_prompts=72 align_steps=8 align_batch_size=2 align_lr=3e-5 save_every=8 online_rounds=8 --out $WORK/new > new.log 2>&1
  tail -1 new.log; uptime
}
uptime; grep -m1 "model name" /proc/cpuinfo
if [ "${ORDER:-old-first}" = new-first ]; then new; old; else old; new; fi
