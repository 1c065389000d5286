"""One online run of today's default demo, alone, on a copy of a demo's data: its wall seconds and step times.

Usage: METHOD=online-exo|rloo python online_ab2.py OUT_DIR (PYTHONPATH picks the code under test). ROOM=0
bypasses the bf16 decode's cache with room (the A/B of the last stop). Data: /work/sbs10/new/data (this machine).
"""

import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import exoalign.sampling as sampling  # noqa: E402
from exoalign.demo.pipeline import Demo, settings_for  # noqa: E402

if os.environ.get("ROOM") == "0":
    sampling._with_room = lambda cache, extra: cache
out = Path(sys.argv[1])
shutil.rmtree(out, ignore_errors=True)
out.mkdir(parents=True)
shutil.copytree("/work/sbs10/new/data", out / "data")
settings = settings_for(False, 0, [])
torch.set_num_threads(1)
hf_logging.set_verbosity_error()
method = os.environ.get("METHOD", "online-exo")
t = time.perf_counter()
Demo(out, settings, "cpu").train(method, 1.0)
rows = [json.loads(line) for line in open(out / "runs" / f"{method}_bpi1" / "metrics.jsonl")]
steps = [round(r["perf/step_s"], 2) for r in rows if "perf/step_s" in r]
print(method, "ROOM", os.environ.get("ROOM"), "total", round(time.perf_counter() - t, 1), "steps", steps, flush=True)
