"""The training head's products in other layouts (packed weight, transposed outputs, row and vocabulary chunks),
fp32, 2 threads, at the throughput job's shape."""

import time

import torch

torch.set_num_threads(2)
R, V, H = 1016, 49152, 576
x = torch.randn(R, H)
w = torch.randn(V, H) * 0.02
g = torch.randn(R, V) * 1e-3
xt = x.t().contiguous()


def lp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")


def fwd_vchunks(n: int) -> torch.Tensor:
    out = torch.empty(R, V)
    for s in range(0, V, n):
        out[:, s : s + n] = lp(x, w[s : s + n])
    return out


def fwd_rchunks(n: int) -> torch.Tensor:
    out = torch.empty(R, V)
    for s in range(0, R, n):
        torch.mm(x[s : s + n], w.t(), out=out[s : s + n])
    return out


pk = torch.ops.mkldnn._reorder_linear_weight(w, R)
cands = {
    "fwd dnn  x Wt": lambda: lp(x, w),
    "fwd dnn packed (pack excluded)": lambda: lp(x, pk),
    "pack W": lambda: torch.ops.mkldnn._reorder_linear_weight(w, R),
    "fwd^T mkl W xt": lambda: w @ xt,
    "fwd^T dnn W xt": lambda: lp(w, x),
    "fwd mkl rows 256 out=": lambda: fwd_rchunks(256),
    "fwd dnn vocab 8192": lambda: fwd_vchunks(8192),
    "dW  mkl  gt x": lambda: g.t() @ x,
    "dW^T mkl xt g": lambda: xt @ g,
    "dW^T dnn xt g": lambda: lp(xt, g.t()),
}
flop = 2 * R * V * H
res: dict[str, list[float]] = {k: [] for k in cands}
for _round in range(5):
    for k, f in cands.items():
        f()
        t = time.perf_counter()
        f()
        res[k].append(time.perf_counter() - t)
for k, v in res.items():
    m = sorted(v)[2]
    print(f"{k:34s} {m * 1e3:7.1f} ms {flop / m / 1e9:5.0f} GF/s  (all: {' '.join(f'{t * 1e3:.0f}' for t in v)})")
