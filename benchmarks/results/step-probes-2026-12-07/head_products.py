"""The training head's three products at the throughput job's shape (1016 labelled rows, SmolLM2's vocabulary),
fp32, 2 threads: MKL against oneDNN for the forward, the input gradient and the weight gradient; with
``--layouts``, other layouts instead (packed weight, transposed outputs, row and vocabulary chunks).

    python head_products.py [--layouts]
"""

import sys
import time

import torch
import torch.nn.functional as F

torch.set_num_threads(2)
R, V, H = 1016, 49152, 576
x = torch.randn(R, H)
w = torch.randn(V, H) * 0.02
g = torch.randn(R, V) * 1e-3


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


if "--layouts" in sys.argv:
    xt = x.t().contiguous()
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
else:
    cands = {
        "fwd mkl  x Wt": lambda: F.linear(x, w),
        "fwd dnn  x Wt": lambda: lp(x, w),
        "dX  mkl  g W": lambda: g @ w,
        "dX  dnn  g W": lambda: lp(g, w.t()),
        "dW  mkl  gt x": lambda: g.t() @ x,
        "dW  dnn  gt x": lambda: lp(g.t(), x.t()),
        "dW  dnn  gt x (g.t contiguous)": lambda: lp(g.t().contiguous(), x.t()),
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
