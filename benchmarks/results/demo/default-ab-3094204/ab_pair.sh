#!/bin/bash
cd /work/prof2
for order in prev new new prev; do
  if [ $order = prev ]; then PP=/work/wt/prev; else PP=/work/main; fi
  uptime
  METHOD=online-exo PYTHONPATH=$PP /work/main/.venv/bin/python online_ab2.py /tmp/oabp_${order}_a 2>&1 | grep -E "ROOM|Error" | sed "s/^/$order /" &
  METHOD=rloo PYTHONPATH=$PP /work/main/.venv/bin/python online_ab2.py /tmp/oabp_${order}_b 2>&1 | grep -E "ROOM|Error" | sed "s/^/$order /" &
  wait
done
uptime
