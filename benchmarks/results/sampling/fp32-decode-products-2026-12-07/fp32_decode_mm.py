"""An fp32 decode step's products (SmolLM2 shapes, 256 and 32 rows, 2 threads): torch's MKL (``F.linear``) against
oneDNN on the plain weight and on the weight packed once. Run it also with ``ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2`` for an AVX2-only CPU's paths."""

import os
import time

import torch
import torch.nn.functional as F

torch.set_num_threads(2)
SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]


def lp(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


print("ATEN", os.environ.get("ATEN_CPU_CAPABILITY"), "ONEDNN", os.environ.get("ONEDNN_MAX_CPU_ISA"))
for rows in (256, 32):
    tot = {"mkl": 0.0, "dnn": 0.0, "dnnpk": 0.0}
    for o, i in SHAPES:
        x = torch.randn(rows, i)
        w = torch.randn(o, i) * 0.02
        pk = torch.ops.mkldnn._reorder_linear_weight(w, rows)
        fs = {"mkl": lambda x=x, w=w: F.linear(x, w), "dnn": lambda x=x, w=w: lp(x, w),
              "dnnpk": lambda x=x, pk=pk: lp(x, pk)}
        res: dict[str, list[float]] = {}
        for _round in range(3):
            for k, f in fs.items():
                for _ in range(3):
                    f()
                n = 20 if o < 10000 else 5
                t = time.perf_counter()
                for _ in range(n):
                    f()
                res.setdefault(k, []).append((time.perf_counter() - t) / n)
        line = []
        for k, v in res.items():
            m = sorted(v)[1]
            tot[k] += m
            line.append(f"{k} {m * 1e3:.3f} ms {2 * rows * o * i / m / 1e9:.0f} GF/s")
        print(rows, (o, i), " | ".join(line))
    print(rows, "sum of one of each:", {k: round(v * 1e3, 2) for k, v in tot.items()})
