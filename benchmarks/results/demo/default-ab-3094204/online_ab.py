import os, sys, shutil, time, json
os.environ.setdefault("OMP_NUM_THREADS", "1"); os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from pathlib import Path
import exoalign.sampling as S
if os.environ.get("ROOM") == "0":
    S._with_room = lambda cache, extra: cache
from exoalign.demo.pipeline import Demo, settings_for
out = Path(sys.argv[1]); shutil.rmtree(out, ignore_errors=True); out.mkdir(parents=True)
shutil.copytree("/work/sbs10/new/data", out / "data")
s = settings_for(False, 0, [])
import torch; torch.set_num_threads(1)
from transformers.utils import logging as hf_logging; hf_logging.set_verbosity_error()
t = time.perf_counter(); Demo(out, s, "cpu").train("online-exo", 1.0)
L = [json.loads(l) for l in open(out / "runs" / "online-exo_bpi1" / "metrics.jsonl")]
print("ROOM", os.environ.get("ROOM"), "total", round(time.perf_counter() - t, 1), "steps", [round(x["perf/step_s"], 2) for x in L if "perf/step_s" in x], flush=True)
