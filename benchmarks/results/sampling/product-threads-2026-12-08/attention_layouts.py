"""The decode attention's two batched products at decode sizes on one thread (bf16, 9 query / 3 key-value heads of
64, 70 keys), five layouts, medians of 5 × 200 calls, µs: ``q @ kᵀ`` as ``_decode_attention`` computes it, ``k @
qᵀ``, ``p @ v`` (as it computes it), ``vᵀ @ pᵀ``, the same as 3-D ``bmm``, ``einsum``, and an fp32 multiply-sum.

    python attention_layouts.py
"""


import torch
from common import bench


def layouts(R: int, KV: int = 3, G: int = 3, D: int = 64, L: int = 70) -> dict:
    q = torch.randn(R, KV, G, D).bfloat16()
    k = torch.randn(R, KV, L, D).bfloat16()
    v = torch.randn(R, KV, L, D).bfloat16()
    p = torch.softmax(torch.randn(R, KV, G, L), -1).bfloat16()
    q3, k3, v3, p3 = q.reshape(-1, G, D), k.reshape(-1, L, D), v.reshape(-1, L, D), p.reshape(-1, G, L)
    qf, kf = q3.float(), k3.float()
    with torch.inference_mode():
        return {
            "q@kT (used)": bench(lambda: torch.matmul(q, k.transpose(-1, -2))),
            "k@qT": bench(lambda: torch.matmul(k, q.transpose(-1, -2))),
            "bmm q@kT": bench(lambda: torch.bmm(q3, k3.transpose(1, 2))),
            "einsum q.k": bench(lambda: torch.einsum("bgd,bld->bgl", q3, k3)),
            "fp32 mul-sum q.k": bench(lambda: (qf.unsqueeze(2) * kf.unsqueeze(1)).sum(-1)),
            "p@v (used)": bench(lambda: torch.matmul(p, v)),
            "vT@pT": bench(lambda: torch.matmul(v.transpose(-1, -2), p.transpose(-1, -2))),
            "bmm p@v": bench(lambda: torch.bmm(p3, v3)),
        }


def main():
    torch.set_num_threads(1)
    for R in (12, 32):
        r = layouts(R)
        print(f"{R} rows: " + ", ".join(f"{name} {t:.0f}" for name, t in r.items()), flush=True)


if __name__ == "__main__":
    main()
