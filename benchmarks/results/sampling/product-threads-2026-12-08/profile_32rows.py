"""One call of the bf16 copy at ``exoalign online``'s default round (8 prompts × K = 4, 32 new tokens, 2 threads):
two timed calls after the warm-up, then a torch.profiler table of a third.

    python profile_32rows.py

``profile_32rows_before.txt`` is the same call profiled at ``333ffa6`` (before :class:`ProductThreads`; from a
scratch copy of this script with its own set-up), ``profile_32rows_after.txt`` this script at ``fb4aa7b``.
"""

import time

import torch
from common import bf16_sampler

sampler, prompts = bf16_sampler(8, 4, 32, 2)
with torch.inference_mode():
    for j in (1, 2):
        t = time.perf_counter()
        out = sampler.generate(prompts[8 * j : 8 * j + 8], list(range(8 * j, 8 * j + 8)), 4)
        print("one call", round(time.perf_counter() - t, 3), "s,", sum(len(c.ids) for g in out for c in g), "tokens")
    with torch.profiler.profile() as prof:
        sampler.generate(prompts[24:32], list(range(24, 32)), 4)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
