"""The bf16 copy's decode attention of one layer at the online-round shape (12 rows, 3 key/value heads × 3 query
heads of 64, 70 cached columns), one thread: as ``attention._decode_attention`` computes it, and in fp32."""

import time

import torch

torch.set_num_threads(1)
R, KV, G, D, L = 12, 3, 3, 64, 70
q = torch.randn(R, KV, G, D, dtype=torch.bfloat16)
k = torch.randn(R, KV, L, D, dtype=torch.bfloat16)
v = torch.randn(R, KV, L, D, dtype=torch.bfloat16)


def bf16() -> torch.Tensor:
    w = torch.matmul(q, k.transpose(-1, -2)) * 0.125
    p = torch.softmax(w, -1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p, v)


def f32() -> torch.Tensor:
    w = torch.matmul(q.float(), k.float().transpose(-1, -2)) * 0.125
    return torch.matmul(torch.softmax(w, -1), v.float()).to(q.dtype)


def score_bf16() -> torch.Tensor:
    return torch.matmul(q, k.transpose(-1, -2))


def score_f32() -> torch.Tensor:
    return torch.matmul(q.float(), k.float().transpose(-1, -2))


for name, f in (("bf16 attention", bf16), ("fp32 attention", f32), ("bf16 score bmm", score_bf16),
                ("fp32 score bmm incl casts", score_f32)):
    for _ in range(50):
        f()
    t = time.perf_counter()
    for _ in range(2000):
        f()
    print(f"{name:28s} {(time.perf_counter() - t) / 2000 * 1e6:.1f} us")
