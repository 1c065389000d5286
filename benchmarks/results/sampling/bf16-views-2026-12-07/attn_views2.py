import time, torch
torch.set_num_threads(2)
R, KV, G, D, Lmax, n = 256, 3, 3, 64, 220, 140
dt = torch.bfloat16
kb = torch.randn(R, KV, Lmax, D, dtype=dt)
q = torch.randn(R, KV, G, D, dtype=dt)
def bench(name, f):
    for _ in range(3): f()
    t = time.perf_counter()
    for _ in range(50): f()
    print(name, f"{(time.perf_counter()-t)/50*1e3:.3f} ms")
kv = kb[:, :, :n]; kc = kv.contiguous()
bench("matmul view", lambda: torch.matmul(q, kv.transpose(-1, -2)))
bench("matmul contig", lambda: torch.matmul(q, kc.transpose(-1, -2)))
q3 = q.reshape(R*KV, G, D)
kv3 = kb.view(R*KV, Lmax, D)[:, :n]
kc3 = kc.view(R*KV, n, D)
bench("bmm view", lambda: torch.bmm(q3, kv3.transpose(1, 2)))
bench("bmm contig", lambda: torch.bmm(q3, kc3.transpose(1, 2)))
bench("bmm full", lambda: torch.bmm(q3, kb.view(R*KV, Lmax, D).transpose(1, 2)))
# k as [R*KV, D, Lmax] layout (keys stored transposed): view of first n columns
kt = kb.view(R*KV, Lmax, D).transpose(1, 2).contiguous()  # (RKV, D, Lmax)
bench("bmm kT-layout view", lambda: torch.bmm(q3, kt[:, :, :n]))
bench("contiguous copy", lambda: kv.contiguous())
