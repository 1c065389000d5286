#!/bin/bash
# Today's default demo: this code (83b3b9a) first, then the last stop's 3094204; nothing else running.
export OMP_WAIT_POLICY=PASSIVE
cd /work/sbs11
uptime
/usr/bin/time -f "new wall %e s" /work/main/.venv/bin/exoalign demo --out /work/sbs11/new > new.log 2>&1
tail -1 new.log; uptime
/usr/bin/time -f "prev wall %e s" env PYTHONPATH=/work/wt/prev /work/main/.venv/bin/python -m exoalign demo --out /work/sbs11/prev > prev.log 2>&1
tail -1 prev.log; uptime
