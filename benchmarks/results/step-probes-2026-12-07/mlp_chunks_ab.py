"""The lean MLP's elementwise passes whole or in row chunks, inside the fp32 step, interleaved in one process.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/results/step-probes-2026-12-07/mlp_chunks_ab.py [rounds]
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from step_setup import setup

from exoalign import gemm
from exoalign.lean import _SwiGLUDown

CHUNK = [256]
ORIGINAL = (_SwiGLUDown.forward, _SwiGLUDown.backward)


def forward_chunked(ctx, gate, up, weight, bias):
    inner = gate.shape[-1]
    g2, u2 = gate.reshape(-1, inner), up.reshape(-1, inner)
    p = torch.empty_like(gate)
    p2 = p.view(-1, inner)
    for s in range(0, g2.shape[0], CHUNK[0]):
        pc = p2[s:s + CHUNK[0]]
        torch.ops.aten.silu.out(g2[s:s + CHUNK[0]], out=pc)
        pc.mul_(u2[s:s + CHUNK[0]])
    w = weight.to(p.dtype)
    out = gemm.linear(p, w, bias.to(p.dtype) if bias is not None else None)
    ctx.save_for_backward(gate, up, w, bias)
    ctx.weight_dtype = weight.dtype
    return out


def backward_chunked(ctx, grad_out):
    gate, up, w, _bias = ctx.saved_tensors
    dy = grad_out.to(gate.dtype)
    inner = gate.shape[-1]
    g2, u2 = gate.reshape(-1, inner), up.reshape(-1, inner)
    dp = gemm.linear(dy, w.to(gate.dtype).t())
    dp2 = dp.view(-1, inner)
    p, du = torch.empty_like(g2), torch.empty_like(g2)
    a = torch.empty((CHUNK[0], inner), dtype=gate.dtype)
    for s in range(0, g2.shape[0], CHUNK[0]):
        e = min(s + CHUNK[0], g2.shape[0])
        ac, gc, uc, dpc = a[: e - s], g2[s:e], u2[s:e], dp2[s:e]
        torch.ops.aten.silu.out(gc, out=ac)
        torch.mul(ac, uc, out=p[s:e])
        torch.mul(dpc, ac, out=du[s:e])
        dpc.mul_(uc)
        torch.ops.aten.silu_backward.grad_input(dpc, gc, grad_input=dpc)
    d_w = (dy.reshape(-1, dy.shape[-1]).t() @ p).to(ctx.weight_dtype)
    return dp, du.view(gate.shape), d_w, None


def use(mode: str) -> None:
    if mode == "whole":
        _SwiGLUDown.forward, _SwiGLUDown.backward = ORIGINAL
    else:
        CHUNK[0] = int(mode)
        _SwiGLUDown.forward, _SwiGLUDown.backward = staticmethod(forward_chunked), staticmethod(backward_chunked)


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 9
    model, fwd_bwd, step = setup()
    modes = ["whole", "256", "128"]
    grads = {}
    for m in modes:  # one forward and backward per mode, no update: the gradients must be equal bit for bit
        use(m)
        fwd_bwd()
        grads[m] = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
    for m in modes[1:]:
        print(m, "largest gradient difference to whole tensors:",
              max(float((a - b).abs().max()) for a, b in zip(grads[m], grads["whole"])))
    del grads
    times: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(rounds):
        for m in modes if r % 2 == 0 else modes[::-1]:
            use(m)
            t = time.perf_counter()
            step()
            times[m].append(time.perf_counter() - t)
        print(r, {m: round(times[m][-1], 3) for m in modes}, flush=True)
    for m in modes:
        v = times[m][1:]
        print(m, "mean", round(statistics.mean(v), 3), "median", round(statistics.median(v), 3))


if __name__ == "__main__":
    main()
