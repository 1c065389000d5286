"""The bf16 sampler with and without :class:`exoalign.sampling.ProductThreads` (decode steps: packed products on
every thread, the rest on one), alternating in one process, the same prompts and seeds.

    python ab.py PROMPTS_PER_CALL CALLS NEW_TOKENS [THREADS] [ROUNDS]

Prints each run's seconds (CALLS calls of PROMPTS_PER_CALL prompts × K = 4), then the sorted runs and whether
both gave the same tokens and log-probs.
"""

import statistics
import sys
import time

import torch
from common import bf16_sampler

import exoalign.sampling as S

B, CALLS, NEW = (int(a) for a in sys.argv[1:4])
THREADS = int(sys.argv[4]) if len(sys.argv) > 4 else 2
ROUNDS = int(sys.argv[5]) if len(sys.argv) > 5 else 4
SPLIT = {"on": True}
Original = S.ProductThreads


class Switched(Original):
    def __init__(self, model):
        super().__init__(model)
        self.packed = self.packed and SPLIT["on"]


S.ProductThreads = Switched
sampler, prompts = bf16_sampler(B, CALLS, NEW, THREADS)
runs = {"off": [], "on": []}
outs = {}
with torch.inference_mode():
    for r in range(ROUNDS):
        for mode in (("on", "off") if r % 2 else ("off", "on")):
            SPLIT["on"] = mode == "on"
            t = time.perf_counter()
            got = []
            for j in range(CALLS):
                idx = list(range(B * j, B * j + B))
                got += [[(c.ids, c.logps) for c in g] for g in sampler.generate([prompts[i] for i in idx], idx, 4)]
            runs[mode].append(time.perf_counter() - t)
            outs[mode] = got
            print(mode, round(runs[mode][-1], 3), flush=True)
tokens = sum(len(ids) for g in outs["on"] for ids, _ in g)
print({k: sorted(round(x, 3) for x in v) for k, v in runs.items()}, "tokens", tokens)
print("median off", round(statistics.median(runs["off"]), 3), "on", round(statistics.median(runs["on"]), 3),
      "ratio", round(statistics.median(runs["on"]) / statistics.median(runs["off"]), 3))
print("same tokens and log-probs", outs["on"] == outs["off"])
