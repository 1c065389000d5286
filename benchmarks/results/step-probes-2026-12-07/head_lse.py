"""The KL pass's head at the eval's shape (888 completion tokens, SmolLM2's 49 152 × 576 head, bf16, one thread):
the log-sum-exp per token as ``_HeadLogps`` computes it (170-row chunks through ``F.linear``), through the packed
weight of π_sft's sampling copy, and with the fp32 conversion in 16-row groups; the products alone.

    python benchmarks/results/step-probes-2026-12-07/head_lse.py
"""

from __future__ import annotations

import statistics
import time

import step_setup  # noqa: F401  (the thread policy and paths)
import torch

from exoalign.logprobs import _row_logsumexp

ROWS, CHUNK = 888, 170


def main() -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(ROWS, 576, generator=g) * 0.5).bfloat16()
    w = (torch.randn(49152, 576, generator=g) * 0.05).bfloat16()
    packed = torch.ops.mkldnn._reorder_linear_weight(w, 64)

    def product(rows: torch.Tensor, use_packed: bool) -> torch.Tensor:
        if use_packed:
            return torch.ops.mkldnn._linear_pointwise(rows, packed, None, "none", [], "")
        return torch.nn.functional.linear(rows, w)

    def lse(use_packed: bool, groups: bool) -> torch.Tensor:
        out = torch.empty(ROWS)
        for s in range(0, ROWS, CHUNK):
            block = product(h[s:s + CHUNK], use_packed)
            if not groups:
                out[s:s + block.shape[0]] = _row_logsumexp(block.float())
                continue
            for r in range(0, block.shape[0], 16):
                e = min(r + 16, block.shape[0])
                out[s + r:s + e] = _row_logsumexp(block[r:e].float())
        return out

    def products_only() -> None:
        for s in range(0, ROWS, CHUNK):
            product(h[s:s + CHUNK], True)

    ways = {"as today": lambda: lse(False, False), "packed": lambda: lse(True, False),
            "packed, 16-row groups": lambda: lse(True, True), "packed products alone": products_only}
    ref = lse(False, False)
    for name in ("packed", "packed, 16-row groups"):
        print(name, "largest difference to today's:", float((ways[name]() - ref).abs().max()))
    times: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(8):
        for k, fn in ways.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    for k, v in times.items():
        print(f"{k}: {statistics.median(v) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
