"""fp32 products through torch's default BLAS (MKL on x86 wheels) against oneDNN's linear (``exoalign.gemm``).

Two measurements, each interleaved so that the host's drift falls on both sides alike:

* ``products``: GFLOP/s of the SmolLM2 step's product shapes (1 536 tokens; forward ``x Wᵀ``, input gradient
  ``dy W``, weight gradient ``dyᵀ x``) and of square products, MKL and oneDNN taking turns, ``--reps`` rounds,
  the median per shape;
* ``step`` (skipped with ``--no-step``): the throughput benchmark's SmolLM2 training step (8 pairs × 128 tokens,
  prompt sharing, lean activations, fused AdamW; ``benchmarks/throughput_systems.py``) in one process,
  ``EXOALIGN_FP32_MATMUL`` switched between ``aten`` and ``onednn`` from one step to the next; the median of
  each after ``--warmup`` steps.

Usage: ``OMP_WAIT_POLICY=PASSIVE python benchmarks/gemm_backends.py --json FILE [--steps 14]``. The JSON records
the CPU, the versions, the load before and after, and which backend ``auto`` picks on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _rate(f, flops: float, reps: int = 3) -> float:
    f()
    t = time.perf_counter()
    for _ in range(reps):
        f()
    return reps * flops / (time.perf_counter() - t) / 1e9


def products(rounds: int) -> list[dict[str, Any]]:
    import torch
    import torch.nn.functional as F

    from exoalign import gemm

    m = 1536
    cases: list[tuple[str, tuple[int, int, int], Any, Any]] = []
    g = torch.Generator().manual_seed(0)
    for k, n in ((576, 1536), (1536, 576), (576, 576), (576, 192)):
        x, w, dy = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(m, n, generator=g)
        cases.append((f"forward x Wᵀ [{m}×{k}]·[{k}×{n}]", (m, k, n),
                      lambda x=x, w=w: F.linear(x, w), lambda x=x, w=w: gemm._lin(x, w)))
        cases.append((f"input gradient dy W [{m}×{n}]·[{n}×{k}]", (m, n, k),
                      lambda dy=dy, w=w: dy @ w, lambda dy=dy, w=w: gemm._lin(dy, w.t())))
        cases.append((f"weight gradient dyᵀ x [{n}×{m}]·[{m}×{k}]", (n, m, k),
                      lambda dy=dy, x=x: dy.t() @ x, lambda dy=dy, x=x: gemm._lin(dy.t(), x.t())))
    for s in (1024, 2048):
        a, b = torch.randn(s, s, generator=g), torch.randn(s, s, generator=g)
        cases.append((f"square {s}", (s, s, s), lambda a=a, b=b: a @ b, lambda a=a, b=b: gemm._lin(a, b.t())))
    rates: dict[str, dict[str, list[float]]] = {name: {"aten": [], "onednn": []} for name, *_ in cases}
    for _ in range(rounds):
        for name, (i, j, k), aten, onednn in cases:
            flops = 2.0 * i * j * k
            rates[name]["aten"].append(_rate(aten, flops))
            rates[name]["onednn"].append(_rate(onednn, flops))
    out = []
    for name, (i, j, k), *_ in cases:
        a, o = statistics.median(rates[name]["aten"]), statistics.median(rates[name]["onednn"])
        out.append({"product": name, "mnk": [i, j, k], "aten_gflops": a, "onednn_gflops": o, "ratio": o / a})
    return out


def step(steps: int, warmup: int) -> dict[str, Any]:
    from throughput_systems import preset

    shape = preset("smollm2")
    before = os.environ.get("EXOALIGN_FP32_MATMUL")
    try:
        return _step(shape, steps, warmup)
    finally:  # the caller's setting back
        if before is None:
            os.environ.pop("EXOALIGN_FP32_MATMUL", None)
        else:
            os.environ["EXOALIGN_FP32_MATMUL"] = before


def _step(shape: Any, steps: int, warmup: int) -> dict[str, Any]:
    import torch
    from throughput_systems import compute_loss_fn, make_assets, pair_batch

    from exoalign.attention import training_attention
    from exoalign.hardware import keep_freed_memory
    from exoalign.lean import apply_lean_activations
    from exoalign.logprobs import autocast, logits_grad_in_place
    from exoalign.models import load_causal_lm, own_trainable_weights

    os.environ["EXOALIGN_FP32_MATMUL"] = "onednn"  # patch the model's layers; each step then picks its backend
    with tempfile.TemporaryDirectory(prefix="exoalign-gemm-") as tmp:
        make_assets(shape, Path(tmp))
        keep_freed_memory(device="cpu")
        model = load_causal_lm(str(Path(tmp) / "policy"))
    model.train()
    own_trainable_weights(model)
    apply_lean_activations(model)
    batch, cfg = pair_batch(shape)
    fn = compute_loss_fn(True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    times: dict[str, list[float]] = {"aten": [], "onednn": []}
    losses: list[tuple[str, float]] = []
    for i in range(steps):
        backend = ("aten", "onednn")[i % 2]
        os.environ["EXOALIGN_FP32_MATMUL"] = backend
        t = time.perf_counter()
        with training_attention():
            with autocast("no", "cpu"), logits_grad_in_place():
                loss, _ = fn(model, batch, cfg)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t
        losses.append((backend, float(loss.detach())))
        print(f"step {i} {backend}: {dt:.2f} s, loss {losses[-1][1]:.6f}", flush=True)
        if i >= warmup:
            times[backend].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"steps_s": times, "median_s": med, "speedup": med["aten"] / med["onednn"], "losses": losses,
            "warmup": warmup, "shape": "SmolLM2-135M, 8 pairs, prompt 64 + completions 64, fp32, prompt sharing"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, required=True, help="where to write the results")
    p.add_argument("--reps", type=int, default=8, help="interleaved rounds of the product timings")
    p.add_argument("--steps", type=int, default=14, help="training steps, the two backends alternating")
    p.add_argument("--warmup", type=int, default=2, help="first steps not counted")
    p.add_argument("--no-step", action="store_true", help="time the products only")
    p.add_argument("--threads", type=int, default=2, help="torch threads (restored on return)")
    args = p.parse_args(argv)

    import torch

    from exoalign import gemm

    if not gemm._onednn_available():
        print("this torch has no oneDNN linear (torch.ops.mkldnn._linear_pointwise): nothing to compare")
        return 1
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, argv)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, argv: list[str] | None) -> int:
    import torch
    from throughput import _cpu_name, load_average, versions

    from exoalign import gemm

    res: dict[str, Any] = {"command": "python benchmarks/gemm_backends.py " + " ".join(sys.argv[1:] if argv is None
                                                                                       else argv),
                           "cpu": _cpu_name(), "threads": torch.get_num_threads(), "versions": versions(),
                           "auto_picks_onednn": gemm._decide("auto"), "load_start": load_average(),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    res["products"] = products(args.reps)
    for r in res["products"]:
        print(f"{r['product']:48s} aten {r['aten_gflops']:6.1f}  oneDNN {r['onednn_gflops']:6.1f} GFLOP/s "
              f"({r['ratio']:.2f}×)")
    if not args.no_step:
        res["step"] = step(args.steps, args.warmup)
        s = res["step"]
        print(f"step: aten {s['median_s']['aten']:.2f} s, oneDNN {s['median_s']['onednn']:.2f} s "
              f"({s['speedup']:.2f}×)")
    res["load_end"] = load_average()
    tmp = args.json.with_suffix(args.json.suffix + ".tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
