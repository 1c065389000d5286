"""The fp32 step on 1 and 2 threads (alternating in one process), and each operator's self time at 2 threads
minus half its time at 1 thread (torch.profiler): where two threads fall short of halving the step.

    python benchmarks/results/step-probes-2026-12-07/thread_scaling.py [rounds]
"""

from __future__ import annotations

import sys
import time

import torch
from step_setup import setup
from torch.profiler import ProfilerActivity, profile


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    _model, fwd_bwd, step = setup()
    for r in range(rounds):
        for threads in (2, 1) if r % 2 else (1, 2):
            torch.set_num_threads(threads)
            t, c = time.perf_counter(), time.process_time()
            step()
            print(f"round {r} threads {threads}: wall {time.perf_counter() - t:.3f} s, "
                  f"CPU {time.process_time() - c:.3f} s", flush=True)
    self_s: dict[int, dict[str, float]] = {}
    for threads in (2, 1, 2, 1):  # the second of each counts
        torch.set_num_threads(threads)
        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            fwd_bwd()
            wall = time.perf_counter() - t
        step()  # clears the gradients (and updates: the weights move a little, as in training)
        self_s[threads] = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
        print(f"profiled forward + backward, {threads} thread(s): wall {wall:.3f} s, operators' self time "
              f"{sum(self_s[threads].values()):.3f} s", flush=True)
    one, two = self_s[1], self_s[2]
    rows = sorted(((two.get(k, 0.0) - one.get(k, 0.0) / 2, k) for k in set(one) | set(two)), reverse=True)
    print("operator | self s, 1 thread | self s, 2 threads | over half")
    for excess, k in rows[:20]:
        print(f"{k[:60]:60s} {one.get(k, 0.0):8.3f} {two.get(k, 0.0):8.3f} {excess:8.3f}")
    print(f"all operators: {sum(r[0] for r in rows):.3f} s over half")


if __name__ == "__main__":
    main()
