"""bf16 attention at the eval's shapes (rows R, queries T, keys L; 9 query / 3 key-value heads of 64, one thread):
SDPA's flash kernel with grouped heads against plain matmuls (`exoalign.attention._plain`); medians of 30 calls.
``python attn_probe.py``"""

from __future__ import annotations

import statistics

import torch
from probe_setup import timed

from exoalign.attention import _plain

SHAPES = [(37, 24, 69), (37, 16, 45), (12, 24, 100), (64, 24, 90), (37, 24, 300), (8, 128, 160)]


def main() -> None:
    sdpa = torch.nn.functional.scaled_dot_product_attention
    for R, T, L in SHAPES:
        q = torch.randn(R, 9, T, 64, dtype=torch.bfloat16)
        k, v = torch.randn(R, 3, L, 64, dtype=torch.bfloat16), torch.randn(R, 3, L, 64, dtype=torch.bfloat16)
        m = torch.ones(R, 1, T, L, dtype=torch.bool).tril(L - T)
        m[..., :3] = False  # three padded key columns

        def flash(q=q, k=k, v=v, m=m) -> torch.Tensor:
            return sdpa(q, k, v, attn_mask=m, scale=0.125, enable_gqa=True).transpose(1, 2)

        def plain(q=q, k=k, v=v, m=m) -> torch.Tensor:
            return _plain(q, k, v, m, 0.125)

        with torch.no_grad():
            flash(), plain()
            tf, tp = (statistics.median(timed(f, 30)) * 1e3 for f in (flash, plain))
            diff = (flash().float() - plain().float()).abs().max().item()
        print(f"R{R} T{T} L{L}: flash {tf:.2f} ms  plain {tp:.2f} ms  max |diff| {diff:.3g}")


if __name__ == "__main__":
    main()
