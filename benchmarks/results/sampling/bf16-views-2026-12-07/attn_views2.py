"""The score product of the bf16 decode attention alone: on a view of the filled columns, a contiguous copy, the
full buffer, and keys stored transposed."""

import time

import torch

torch.set_num_threads(2)
R, KV, G, D, LMAX, N = 256, 3, 3, 64, 220, 140
dt = torch.bfloat16
kb = torch.randn(R, KV, LMAX, D, dtype=dt)
q = torch.randn(R, KV, G, D, dtype=dt)


def bench(name, f):
    for _ in range(3):
        f()
    t = time.perf_counter()
    for _ in range(50):
        f()
    print(name, f"{(time.perf_counter() - t) / 50 * 1e3:.3f} ms")


kv = kb[:, :, :N]
kc = kv.contiguous()
q3 = q.reshape(R * KV, G, D)
kv3 = kb.view(R * KV, LMAX, D)[:, :N]
kc3 = kc.view(R * KV, N, D)
kt = kb.view(R * KV, LMAX, D).transpose(1, 2).contiguous()  # (R·KV, D, LMAX): keys stored transposed
bench("matmul view", lambda: torch.matmul(q, kv.transpose(-1, -2)))
bench("matmul contig", lambda: torch.matmul(q, kc.transpose(-1, -2)))
bench("bmm view", lambda: torch.bmm(q3, kv3.transpose(1, 2)))
bench("bmm contig", lambda: torch.bmm(q3, kc3.transpose(1, 2)))
bench("bmm full", lambda: torch.bmm(q3, kb.view(R * KV, LMAX, D).transpose(1, 2)))
bench("bmm kT-layout view", lambda: torch.bmm(q3, kt[:, :, :N]))
bench("contiguous copy", lambda: kv.contiguous())
