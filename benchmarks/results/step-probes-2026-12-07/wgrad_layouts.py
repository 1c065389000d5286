"""A SmolLM2 layer's weight gradients (1 536 rows) through MKL (``dyᵀ x``, torch's choice) and through oneDNN's
linear with the layer input transposed once for the products that share it, 2 threads, 25 rounds interleaved.

    python benchmarks/results/step-probes-2026-12-07/wgrad_layouts.py
"""

from __future__ import annotations

import statistics
import time

import step_setup  # noqa: F401  (the thread policy and paths)
import torch

T = 1536
GROUPS = {  # layer input x and the output gradients of the products that read it
    "q/k/v": (576, (576, 192, 192)),
    "o": (576, (576,)),
    "gate+up": (576, (1536, 1536)),
    "down": (1536, (576,)),
}


def onednn(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], "")


def mkl(x, dys):
    return [dy.t() @ x for dy in dys]


def onednn_shared_transpose(x, dys):
    xt = x.t().contiguous()  # once per layer input
    return [onednn(xt, dy.t()).t() for dy in dys]  # (xᵀ dy)ᵀ as a view


def main() -> None:
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    for name, (k, outs) in GROUPS.items():
        x = torch.randn(T, k, generator=g)
        dys = [torch.randn(T, n, generator=g) for n in outs]
        for a, b in zip(onednn_shared_transpose(x, dys), mkl(x, dys)):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-2)
        times: dict[str, list[float]] = {"mkl": [], "onednn": []}
        for _ in range(25):
            for key, fn in (("mkl", mkl), ("onednn", onednn_shared_transpose)):
                t = time.perf_counter()
                fn(x, dys)
                times[key].append(time.perf_counter() - t)
        flop = sum(2 * T * n * k for n in outs)
        print(name, "  ".join(f"{key} {statistics.median(v) * 1e3:.2f} ms ({flop / statistics.median(v) / 1e9:.0f} "
                              f"GFLOP/s)" for key, v in times.items()))


if __name__ == "__main__":
    main()
