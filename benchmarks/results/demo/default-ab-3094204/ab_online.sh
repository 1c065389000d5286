#!/bin/bash
# alternate prev/new one online-exo run alone
cd /work/prof2
for order in prev new new prev; do
  if [ $order = prev ]; then PP=/work/wt/prev; else PP=/work/main; fi
  uptime
  PYTHONPATH=$PP /work/main/.venv/bin/python online_ab2.py /tmp/oab_$order 2>&1 | grep -E "ROOM|Error" | sed "s/^/$order /"
done
uptime
