"""Lean activations on or off: step time, peak RSS and page faults of the throughput benchmark's exoalign step.

One process per setting (run it twice, or under different ``MALLOC_*`` environments, to compare): SmolLM2 (or
the 14M model), the benchmark's batch of 8 pairs (prompt 64 / completions 64) with prompt sharing, fp32,
``exoalign.train.step.compute_loss`` + backward + fused AdamW, ``--steps`` steps; one line per step with its
wall time, peak RSS so far, system seconds and minor page faults, then the median of the steps after the two
first.

    .venv/bin/python benchmarks/lean_memory.py --lean on
    .venv/bin/python benchmarks/lean_memory.py --lean off
    MALLOC_MMAP_THRESHOLD_=1048576 .venv/bin/python benchmarks/lean_memory.py --lean on   # live-tensor peak
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput_systems import MODELS, compute_loss_fn, make_assets, pair_batch, preset  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=MODELS, default="smollm2")
    p.add_argument("--lean", choices=("on", "off"), default="on")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    import torch

    from exoalign.lean import apply_lean_activations
    from exoalign.models import load_causal_lm

    torch.set_num_threads(args.threads)
    shape = preset(args.model)
    with tempfile.TemporaryDirectory(prefix="exoalign-lean-") as tmp:
        make_assets(shape, Path(tmp))
        model = load_causal_lm(str(Path(tmp) / "policy"))
    model.train()
    patched = apply_lean_activations(model) if args.lean == "on" else {"mlp": 0, "norm": 0}
    batch, loss_cfg = pair_batch(shape)
    fn = compute_loss_fn(True)
    opt = torch.optim.AdamW(model.parameters(), lr=0.0, fused=True)  # lr 0: every step sees the same weights
    print(f"model {args.model}, lean {args.lean} (patched {patched}), load {os.getloadavg()[0]:.2f}")
    times = []
    for i in range(args.steps):
        r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        loss, _ = fn(model, batch, loss_cfg)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        print(f"step {i}: {times[-1]:.2f} s, loss {float(loss.detach()):.6f}, peak RSS {r1.ru_maxrss / 1024:.0f} MiB, "
              f"sys {r1.ru_stime - r0.ru_stime:.2f} s, minor faults {r1.ru_minflt - r0.ru_minflt}, "
              f"load {os.getloadavg()[0]:.2f}", flush=True)
    if len(times) > 2:
        print(f"median s/step of steps 2..{len(times) - 1}: {statistics.median(times[2:]):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
