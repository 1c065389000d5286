import time, torch
torch.set_num_threads(2)
R, KV, G, D, Lmax = 256, 3, 3, 64, 220
for dt in (torch.bfloat16, torch.float32):
    kb = torch.randn(R, KV, Lmax, D, dtype=dt); vb = torch.randn(R, KV, Lmax, D, dtype=dt)
    q = torch.randn(R, KV, G, D, dtype=dt)
    def att(k, v):
        w = torch.matmul(q, k.transpose(-1, -2))
        p = torch.softmax(w, -1, dtype=torch.float32).to(dt)
        return torch.matmul(p, v)
    for n in (140, 220):
        for name, k, v in (("full", kb, vb), ("view", kb[:, :, :n], vb[:, :, :n]), ("contig", kb[:, :, :n].contiguous(), vb[:, :, :n].contiguous())):
            if name == "full" and n != 220: continue
            for _ in range(3): att(k, v)
            t = time.perf_counter()
            for _ in range(30): att(k, v)
            print(dt, n, name, f"{(time.perf_counter()-t)/30*1e3:.2f} ms")
