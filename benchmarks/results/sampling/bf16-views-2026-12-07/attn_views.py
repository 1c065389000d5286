"""The bf16 copy's decode attention alone: the full static buffer, a view of its filled columns, a contiguous copy."""

import time

import torch

torch.set_num_threads(2)
R, KV, G, D, LMAX = 256, 3, 3, 64, 220


def att(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    w = torch.matmul(q, k.transpose(-1, -2))
    p = torch.softmax(w, -1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p, v)


for dt in (torch.bfloat16, torch.float32):
    kb = torch.randn(R, KV, LMAX, D, dtype=dt)
    vb = torch.randn(R, KV, LMAX, D, dtype=dt)
    q = torch.randn(R, KV, G, D, dtype=dt)
    for n in (140, 220):
        cases = [("view", kb[:, :, :n], vb[:, :, :n]),
                 ("contig", kb[:, :, :n].contiguous(), vb[:, :, :n].contiguous())]
        if n == LMAX:
            cases.insert(0, ("full", kb, vb))
        for name, k, v in cases:
            for _ in range(3):
                att(q, k, v)
            t = time.perf_counter()
            for _ in range(30):
                att(q, k, v)
            print(dt, n, name, f"{(time.perf_counter() - t) / 30 * 1e3:.2f} ms")
