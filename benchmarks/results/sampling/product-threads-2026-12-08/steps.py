"""Decode steps of the bf16 sampler timed one by one, with and without :class:`exoalign.sampling.ProductThreads`
in alternate steps (the split changes no number, so the samples are the same): a comparison the VM's drift
does not move, since both settings see the same minutes.

    python steps.py PROMPTS_PER_CALL CALLS NEW_TOKENS [THREADS]
"""

import statistics
import sys
import time

import torch
from common import bf16_sampler

import exoalign.sampling as S

B, CALLS, NEW = (int(a) for a in sys.argv[1:4])
THREADS = int(sys.argv[4]) if len(sys.argv) > 4 else 2
Original = S.ProductThreads
times = {False: [], True: []}
state = {"n": 0, "t": 0.0, "on": False}


class Alternating(Original):
    def __enter__(self):
        state["on"] = state["n"] % 2 == 1
        state["n"] += 1
        if not state["on"]:
            state["t"] = time.perf_counter()
            return self
        out = super().__enter__()
        state["t"] = time.perf_counter()
        return out

    def __exit__(self, *exc):
        dt = time.perf_counter() - state["t"]
        super().__exit__(*exc)
        times[state["on"]].append(dt)


S.ProductThreads = Alternating
sampler, prompts = bf16_sampler(B, CALLS, NEW, THREADS)
with torch.inference_mode():
    for _ in range(2):
        times[False].clear()
        times[True].clear()
        for j in range(CALLS):
            idx = list(range(B * j, B * j + B))
            sampler.generate([prompts[i] for i in idx], idx, 4)
        off, on = times[False], times[True]
        n = min(len(off), len(on))
        pairs = [b / a for a, b in zip(off[:n], on[:n])]
        print(f"{B} prompts x 4, {THREADS} threads: {n} step pairs; step ms median off {statistics.median(off) * 1e3:.1f}"
              f" on {statistics.median(on) * 1e3:.1f}; sum off {sum(off[:n]):.2f} s on {sum(on[:n]):.2f} s; "
              f"median paired ratio on/off {statistics.median(pairs):.3f}", flush=True)
