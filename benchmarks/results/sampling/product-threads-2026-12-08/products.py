"""bf16 products at decode sizes on one thread: SmolLM2's MLP gate shape ``[ROWS, 576] × [576, 1 536]`` over 60
distinct weights (too many for the caches: the weights stream from memory, as in a decode step), medians of 7,
µs per product, GFLOP/s and GB/s of weights read. Packed weights (``_reorder_linear_weight`` with 64 as the batch
hint, as ``pack_linears`` packs them; with the row count as the hint), and the transposed product
``W @ aᵀ`` on plain weights (oneDNN does not reorder its first operand). Then a plain fp32 sum over 270 MB: the
rate one thread reads memory at.

    python products.py
"""

import time

import torch


def bench(f, reps=7):
    for _ in range(2):
        f()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[reps // 2]


def main():
    torch.set_num_threads(1)
    lin = torch.ops.mkldnn._linear_pointwise
    N, K, L = 1536, 576, 60
    ws = [torch.randn(N, K).bfloat16() for _ in range(L)]
    pk64 = [torch.ops.mkldnn._reorder_linear_weight(w, 64) for w in ws]
    for rows in (1, 4, 12, 32, 64):
        a = torch.randn(rows, K).bfloat16()
        pkm = [torch.ops.mkldnn._reorder_linear_weight(w, rows) for w in ws]
        t1 = bench(lambda a=a: [lin(a, p, None, "none", [], "") for p in pk64]) / L
        t2 = bench(lambda a=a, pkm=pkm: [lin(a, p, None, "none", [], "") for p in pkm]) / L
        t3 = bench(lambda a=a: [torch.mm(w, a.t()) for w in ws]) / L
        f, b = 2 * rows * N * K, N * K * 2
        print(f"{rows:3d} rows: packed(64) {t1 * 1e6:6.1f} µs {f / t1 / 1e9:6.1f} GFLOP/s {b / t1 / 1e9:5.1f} GB/s | "
              f"packed(rows) {t2 * 1e6:6.1f} µs | W @ aT {t3 * 1e6:6.1f} µs", flush=True)
    x = torch.randn(135_000_000 // 2)
    t = bench(lambda: x.sum())
    print(f"fp32 sum over 270 MB: {x.numel() * 4 / t / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
