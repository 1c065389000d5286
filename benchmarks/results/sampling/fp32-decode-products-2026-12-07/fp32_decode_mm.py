import time, torch, torch.nn.functional as F, os
torch.set_num_threads(2)
shapes = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]
print("ATEN", os.environ.get("ATEN_CPU_CAPABILITY"), "ONEDNN", os.environ.get("ONEDNN_MAX_CPU_ISA"))
for rows in (256, 32):
    tot = {"mkl": 0.0, "dnn": 0.0, "dnnpk": 0.0}
    for (o, i) in shapes:
        x = torch.randn(rows, i); w = torch.randn(o, i) * 0.02
        try:
            pk = torch.ops.mkldnn._reorder_linear_weight(w, rows)
        except Exception as e:
            pk = None; print("no fp32 pack:", e)
        fs = {"mkl": lambda: F.linear(x, w), "dnn": lambda: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")}
        if pk is not None:
            fs["dnnpk"] = lambda: torch.ops.mkldnn._linear_pointwise(x, pk, None, "none", [], "")
        res = {}
        for r in range(3):
            for k, f in fs.items():
                for _ in range(3): f()
                n = 20 if o < 10000 else 5
                t = time.perf_counter()
                for _ in range(n): f()
                dt = (time.perf_counter() - t) / n
                res.setdefault(k, []).append(dt)
        line = []
        for k, v in res.items():
            m = sorted(v)[1]; tot[k] += m * (1 if o < 10000 else 1)
            line.append(f"{k} {m*1e3:.3f} ms {2*rows*o*i/m/1e9:.0f} GF/s")
        print(rows, (o, i), " | ".join(line))
    print(rows, "sum of one of each:", {k: round(v*1e3, 2) for k, v in tot.items()})
