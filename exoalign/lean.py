"""Lean activations: the gated MLP and RMSNorm keep fewer tensors for backward (same numbers, less memory).

Autograd through a Llama-style block keeps, per token and layer, the gate and up projections, ``silu(gate)``,
their product (the down projection's input), and for each RMSNorm the normalised hidden state beside its input.
On SmolLM2-135M (intermediate 1536, hidden 576) that is most of the step's activation memory. Two autograd
functions keep only what cannot be recomputed cheaply and redo the elementwise rest in backward:

* :class:`_SwiGLUDown` — ``down(act(gate) ⊙ up)`` for ``act`` = SiLU: keeps ``gate`` and ``up`` ``[…, I]``
  (not ``act(gate)`` nor the product) and recomputes them for the down projection's weight gradient;
* :class:`_RMSNorm` — ``w ⊙ (x · rsqrt(mean(x²) + ε))`` (Llama's form, computed in fp32 and cast back to the
  input dtype before the weight): keeps ``x`` and one ``rstd`` per token instead of the normalised copy.

:func:`apply_lean_activations` swaps the ``forward`` of matching modules in place (weights, state dict and
``save_pretrained`` are untouched). A module is patched only when its class passes a numerical probe against
its own forward (outputs and gradients on a random input, once per class), so an architecture whose MLP or norm
differs (Gemma's ``1 + w``, a GELU MLP, LoRA-wrapped projections, quantised layers) keeps its own code.
:func:`remove_lean_activations` restores the original forwards.
"""

from __future__ import annotations

import logging
import types

import torch
import torch.nn.functional as F

from . import gemm

log = logging.getLogger(__name__)

_PROBE: dict[tuple[type, str], bool] = {}  # (module class, kind) -> lean forward equals the original
_TOL = 1e-5  # largest difference allowed in the probe, relative to the largest value


class _SwiGLUDown(torch.autograd.Function):
    """``y = (silu(g) ⊙ u) Wᵀ + b`` keeping ``g``, ``u`` for backward. ``g``, ``u``: ``[…, I]``; ``W``: ``[H, I]``
    (kept as cast for the forward: under bf16 autocast its bf16 copy, 1.7 MB a layer on SmolLM2, not cast again).

    Backward, with ``a = silu(g)``, ``p = a ⊙ u`` and ``dp = dy W``: ``dW = dyᵀ p``, ``db = Σ dy``,
    ``du = dp ⊙ a``, ``dg = silu'(g) ⊙ dp ⊙ u`` (ATen's fused ``silu_backward``: one pass instead of the five
    elementwise ones that spell out ``σ(g)(1 + g(1 − σ(g)))``). The compute dtype is that of ``g`` (bf16 under
    autocast, like autocast's own linear); the weight and bias gradients come back in their parameters' dtype.
    """

    @staticmethod
    def forward(ctx, gate, up, weight, bias):
        p = F.silu(gate) * up  # (…, I)
        w = weight.to(p.dtype)
        out = gemm.linear(p, w, bias.to(p.dtype) if bias is not None else None)  # (…, H)
        ctx.save_for_backward(gate, up, w, bias)  # w: the weight itself, or its compute-dtype copy (no re-cast)
        ctx.weight_dtype = weight.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        gate, up, w, bias = ctx.saved_tensors
        need_g, need_u, need_w, need_b = ctx.needs_input_grad
        cd = gate.dtype
        dy = grad_out.to(cd)  # (…, H)
        act = F.silu(gate) if need_w or need_u else None  # (…, I)
        d_w = d_b = d_gate = d_up = None
        if need_w:
            p = act * up
            d_w = (dy.reshape(-1, dy.shape[-1]).t() @ p.reshape(-1, p.shape[-1])).to(ctx.weight_dtype)  # (H, I)
            del p
        if need_b and bias is not None:
            d_b = dy.reshape(-1, dy.shape[-1]).sum(0).to(bias.dtype)
        if need_g or need_u:
            dp = gemm.matmul(dy.reshape(-1, dy.shape[-1]), w.to(cd)).view(*dy.shape[:-1], w.shape[1])  # (…, I), ours
            if need_u:
                d_up = dp * act
            if need_g:
                d_gate = torch.ops.aten.silu_backward(dp.mul_(up), gate)
        return d_gate, d_up, d_w, d_b


class _RMSNorm(torch.autograd.Function):
    """``y = w ⊙ cast(x̂)``, ``x̂ = x · r``, ``r = rsqrt(mean(x²) + ε)`` (fp32), keeping ``x`` and ``r`` ``[…, 1]``.

    Backward: ``dw = Σ dy ⊙ x̂``; with ``gx = dy ⊙ w`` (fp32), ``dx = r (gx − x̂ · mean(gx ⊙ x̂))``.
    """

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        x32 = x.to(torch.float32)
        r = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # (…, 1)
        out = weight * (x32 * r).to(x.dtype)
        ctx.save_for_backward(x, weight, r)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, r = ctx.saved_tensors
        xhat = x.to(torch.float32) * r  # (…, D)
        d_w = None
        if ctx.needs_input_grad[1]:
            d_w = (grad_out.to(torch.float32) * xhat.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        d_x = None
        if ctx.needs_input_grad[0]:
            gx = (grad_out * weight).to(torch.float32)  # (…, D)
            dot = (gx * xhat).mean(-1, keepdim=True)
            d_x = gx.sub_(xhat.mul_(dot)).mul_(r).to(x.dtype)
        return d_x, d_w, None


def _mlp_forward(self, x):
    return _SwiGLUDown.apply(self.gate_proj(x), self.up_proj(x), self.down_proj.weight, self.down_proj.bias)


def _norm_forward(self, x):
    return _RMSNorm.apply(x, self.weight, float(self._lean_eps))


def _is_silu(act) -> bool:
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU")


def _mlp_candidate(m: torch.nn.Module) -> bool:
    parts = [getattr(m, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    return all(type(p) is torch.nn.Linear for p in parts) and _is_silu(getattr(m, "act_fn", None))


def _norm_eps(m: torch.nn.Module) -> float | None:
    if "RMSNorm" not in type(m).__name__ or not isinstance(getattr(m, "weight", None), torch.nn.Parameter):
        return None
    eps = getattr(m, "variance_epsilon", getattr(m, "eps", None))
    return float(eps) if isinstance(eps, (int, float)) else None


def _probe(m: torch.nn.Module, kind: str) -> bool:
    """Lean and original forward of a copy of ``m`` agree (output and gradients, fp32) on a random input."""
    key = (type(m), kind)
    if key in _PROBE:
        return _PROBE[key]
    import copy

    ok = False
    try:
        probe = copy.deepcopy(m).float().cpu()
        width = probe.gate_proj.in_features if kind == "mlp" else probe.weight.shape[-1]
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # a non-trivial norm weight: the default ones would hide a (1 + w) form
            for p in probe.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        x = torch.randn(2, 3, width, generator=g)
        outs = []
        for lean in (False, True):
            xi = x.clone().requires_grad_(True)
            if lean:
                fwd = _mlp_forward if kind == "mlp" else _norm_forward
                probe._lean_eps = _norm_eps(probe)
                y = fwd(probe, xi)
            else:
                y = type(probe).forward(probe, xi)
            w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
            grads = torch.autograd.grad((y * w).sum(), [xi, *probe.parameters()])
            outs.append([y.detach(), *grads])
        ok = all(float((a - b).abs().max()) <= _TOL * max(float(a.abs().max()), 1.0) for a, b in zip(*outs, strict=True))
    except Exception as e:  # any failure: the module keeps its own forward
        log.debug("lean %s probe failed for %s: %s", kind, type(m).__name__, e)
    _PROBE[key] = ok
    return ok


def apply_lean_activations(model: torch.nn.Module) -> dict[str, int]:
    """Patch the gated-SiLU MLPs and RMSNorms of ``model`` in place; returns ``{"mlp": n, "norm": n}`` patched.

    Idempotent. Modules whose class fails the probe (or does not look like either) are left alone.
    """
    counts = {"mlp": 0, "norm": 0}
    for m in model.modules():
        if "_lean_forward" in m.__dict__:
            counts[m._lean_forward] += 1
            continue
        if _mlp_candidate(m) and _probe(m, "mlp"):
            m.forward = types.MethodType(_mlp_forward, m)
            m._lean_forward = "mlp"
            counts["mlp"] += 1
        elif (eps := _norm_eps(m)) is not None and _probe(m, "norm"):
            m._lean_eps = eps
            m.forward = types.MethodType(_norm_forward, m)
            m._lean_forward = "norm"
            counts["norm"] += 1
    return counts


def remove_lean_activations(model: torch.nn.Module) -> None:
    """Undo :func:`apply_lean_activations`: every module runs its class's own forward again."""
    for m in model.modules():
        if m.__dict__.pop("_lean_forward", None) is not None:
            m.__dict__.pop("forward", None)
            m.__dict__.pop("_lean_eps", None)
