"""One KL pass of π_sft (bf16 copy) over 24-token completions of the demo's eval prompts, on kept prompt caches:
three timings, then a torch.profiler table of a fourth with ``--prof``. ``python kl_probe.py [--prof]``"""

from __future__ import annotations

import sys

import torch
from probe_setup import setup, timed

from exoalign.eval.reference import PrefixCachedLogps


def main() -> None:
    model, ids, pad = setup()
    ref = PrefixCachedLogps(model, pad, 1.0)
    g = torch.Generator().manual_seed(0)
    comps = [[torch.randint(100, 40000, (24,), generator=g).tolist()] for _ in ids]
    ref(ids, comps)  # builds the prompt caches
    print("KL pass s", [round(t, 3) for t in timed(lambda: ref(ids, comps), 3)])
    if "--prof" in sys.argv:
        from torch.profiler import profile

        with profile() as p:
            ref(ids, comps)
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
