"""Lean activations: the gated MLP and RMSNorm keep fewer tensors for backward (same numbers, less memory).

Autograd through a Llama-style block keeps, per token and layer, the gate and up projections, ``silu(gate)``,
their product (the down projection's input), and for each RMSNorm the normalised hidden state beside its input.
On SmolLM2-135M (intermediate 1536, hidden 576) that is most of the step's activation memory. Two autograd
functions keep only what cannot be recomputed cheaply and redo the elementwise rest in backward:

* :class:`_SwiGLUDown` — ``down(act(gate) ⊙ up)`` for ``act`` = SiLU: keeps ``gate`` and ``up`` ``[…, I]``
  (not ``act(gate)`` nor the product) and recomputes them for the down projection's weight gradient;
* :class:`_RMSNorm` — ``w ⊙ (x · rsqrt(mean(x²) + ε))`` (Llama's form, computed in fp32 and cast back to the
  input dtype before the weight): keeps ``x`` and one ``rstd`` per token instead of the normalised copy.

:func:`apply_lean_activations` gives matching modules, in place, a subclass of their own class whose ``forward`` is
the lean one (weights, state dict and ``save_pretrained`` are untouched; a class, because transformers'
kernelization drops instance-level forwards whenever the model's mode changes). A module is patched only when its
class passes a numerical probe against its own forward (outputs and gradients on a random input, once per class),
so an architecture whose MLP or norm differs (Gemma's ``1 + w``, a GELU MLP, LoRA-wrapped projections, quantised
layers) keeps its own code, and so does a module whose ``forward`` something else has replaced (a hub kernel,
accelerate's offloading hooks).
:func:`remove_lean_activations` restores the original forwards.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import weakref
from collections.abc import Iterator

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
            dp = gemm.linear(dy, w.to(cd).t())  # (…, I) = dy W, a fresh buffer of our own
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
        r = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # (…, 1); Llama's own ops: the same bits
        h = (x32 * r).to(x.dtype)
        out = h.mul_(weight) if torch.result_type(h, weight) == h.dtype else weight * h
        ctx.save_for_backward(x, weight, r)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, r = ctx.saved_tensors
        if x.dtype == weight.dtype == grad_out.dtype == torch.float32:
            return _RMSNorm._backward_fp32(ctx, grad_out, x, weight, r)
        xhat = x.to(torch.float32) * r  # (…, D)
        d_w = None
        if ctx.needs_input_grad[1]:
            d_w = (grad_out.to(torch.float32) * xhat.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        d_x = None
        if ctx.needs_input_grad[0]:
            gx = (grad_out * weight).to(torch.float32)  # (…, D)
            dot = (gx * xhat).mean(-1, keepdim=True)
            d_x = gx.addcmul_(xhat, dot, value=-1).mul_(r).to(x.dtype)
        return d_x, d_w, None

    @staticmethod
    def _backward_fp32(ctx, grad_out, x, weight, r):
        """The same gradients in fp32 without the normalised copy: with ``q = dy ⊙ x`` ``[T, D]``,
        ``dw = qᵀ r`` and ``Σ_j dy_j w_j x̂_j = r (q w)`` are two matrix-vector products, and
        ``dx = r (dy ⊙ w) − r³ (q w / D) x``: 12 passes over ``[T, D]`` arrays instead of 17."""
        D = x.shape[-1]
        g2, x2, r1 = grad_out.reshape(-1, D), x.reshape(-1, D), r.reshape(-1)
        q = g2 * x2  # (T, D)
        d_w = (q.t() @ r1) if ctx.needs_input_grad[1] else None  # (D,)
        d_x = None
        if ctx.needs_input_grad[0]:
            c = (q @ weight).mul_(r1.pow(3)).div_(-D)  # (T,) −r³ (q w) / D
            d_x = (g2 * weight).mul_(r1[:, None]).addcmul_(x2, c[:, None]).view(x.shape)
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


def _agree(original: list[torch.Tensor], lean: list[torch.Tensor], tol: float) -> bool:
    """The probes' test: each pair has one dtype and shape and differs by at most ``tol`` of the original's
    largest magnitude (at least 1)."""
    return all(a.dtype == b.dtype and a.shape == b.shape
               and float((a.float() - b.float()).abs().max()) <= tol * max(float(a.abs().max()), 1.0)
               for a, b in zip(original, lean, strict=True))


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
        ok = _agree(*outs, tol=_TOL)
    except Exception as e:  # any failure: the module keeps its own forward
        log.debug("lean %s probe failed for %s: %s", kind, type(m).__name__, e)
    _PROBE[key] = ok
    return ok


def _never(module: torch.nn.Module) -> bool:
    return False


_LEAN_CLASSES: dict[tuple[type, str], type] = {}


def _lean_class(cls: type, kind: str) -> type:
    """The subclass of ``cls`` whose ``forward`` is the lean one (made once per class, importable by name).

    A class, not an instance attribute, because transformers (≥ 5, with the ``kernels`` package, on by default)
    re-kernelizes a model on every ``train()``/``eval()``: for each module of a ``use_kernel_forward_from_hub``
    class (most RMSNorms) it drops the instance's ``forward`` and installs a hub kernel or the class's own. Any
    probe or evaluation that flips the mode would silently undo an instance patch. ``kernel_condition`` makes
    kernelize skip these modules, so neither a hub kernel nor the class's forward replaces the lean one
    (``train.lean_activations=false`` gives the hub kernels back).
    """
    key = (cls, kind)
    if key not in _LEAN_CLASSES:
        name = f"Lean_{kind}_{cls.__module__}_{cls.__qualname__}".replace(".", "_")
        lean = type(name, (cls,), {
            "forward": _mlp_forward if kind == "mlp" else _norm_forward,
            "kernel_condition": staticmethod(_never),
            "__module__": __name__,
            "__qualname__": name,
            "_lean_base": cls,
            "_get_name": lambda self: f"Lean{cls.__name__}",  # what print(model) shows
        })
        setattr(sys.modules[__name__], name, lean)  # pickle finds the class by module and name
        _LEAN_CLASSES[key] = lean
    return _LEAN_CLASSES[key]


def apply_lean_activations(model: torch.nn.Module) -> dict[str, int]:
    """Patch the gated-SiLU MLPs and RMSNorms of ``model`` in place; returns ``{"mlp": n, "norm": n}`` patched.

    Each patched module's class becomes a subclass of its own with the lean ``forward`` (:func:`_lean_class`).
    Idempotent. Modules whose class fails the probe (or does not look like either) are left alone.
    """
    counts = {"mlp": 0, "norm": 0}
    for m in model.modules():
        if "_lean_forward" in m.__dict__:
            counts[m._lean_forward] += 1
            continue
        if "forward" in m.__dict__:  # another wrapper or kernel owns this module's forward: leave it
            continue
        if _mlp_candidate(m) and _probe(m, "mlp"):
            kind = "mlp"
        elif (eps := _norm_eps(m)) is not None and _probe(m, "norm"):
            kind = "norm"
            m._lean_eps = eps
        else:
            continue
        m.__class__ = _lean_class(type(m), kind)
        m._lean_forward = kind
        counts[kind] += 1
    return counts


def remove_lean_activations(model: torch.nn.Module) -> None:
    """Undo :func:`apply_lean_activations`: every module runs its class's own forward again."""
    for m in model.modules():
        if m.__dict__.pop("_lean_forward", None) is not None:
            m.__dict__.pop("_lean_eps", None)
            m.__class__ = type(m)._lean_base


class _Rotary(torch.autograd.Function):
    """The rotary embedding ``x cos + rotate_half(x) sin`` (``rotate_half(x) = [−x₂, x₁]``, transformers' Llama
    form) as one function: the output is ``x cos`` plus two in-place products on its halves (two passes instead of
    the five of ``neg``, ``cat``, two products and a sum, and as few in backward, where autograd would also add the
    two branches' gradients). ``cos``, ``sin``: broadcastable to ``x``, no gradient. Backward, with ``g = [g₁, g₂]``:
    ``dx₁ = g₁ cos₁ + g₂ sin₂``, ``dx₂ = g₂ cos₂ − g₁ sin₁`` (halves of the last dimension). The output has the
    dtype ``x cos`` has (under autocast the fp32 tables promote a bf16 query, as in transformers)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        h = x.shape[-1] // 2
        out = x * cos
        out[..., :h].addcmul_(x[..., h:], sin[..., :h], value=-1)
        out[..., h:].addcmul_(x[..., :h], sin[..., h:])
        ctx.save_for_backward(cos, sin)
        ctx.x_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        cos, sin = ctx.saved_tensors
        h = grad_out.shape[-1] // 2
        d = grad_out * cos
        d[..., :h].addcmul_(grad_out[..., h:], sin[..., h:])
        d[..., h:].addcmul_(grad_out[..., :h], sin[..., :h], value=-1)
        return d.to(ctx.x_dtype), None, None


def _fast_rotary_for(original):
    """``apply_rotary_pos_emb(q, k, cos, sin[, unsqueeze_dim=…])`` through :class:`_Rotary`; any call it does not
    cover (other arguments, a partial rotary width, tables that need gradients, compilation) goes to
    ``original``."""

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        d = q.shape[-1]
        if (args or set(kwargs) - {"unsqueeze_dim"} or d % 2 or k.shape[-1] != d or cos.shape[-1] != d
                or sin.shape[-1] != d or cos.requires_grad or sin.requires_grad or torch.compiler.is_compiling()):
            return original(q, k, cos, sin, *args, **kwargs)
        dim = kwargs.get("unsqueeze_dim", 1)
        cos, sin = cos.unsqueeze(dim), sin.unsqueeze(dim)
        return _Rotary.apply(q, cos, sin), _Rotary.apply(k, cos, sin)

    apply_rotary_pos_emb._exoalign_original = original
    return apply_rotary_pos_emb


_ROTARY_PROBE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # transformers' function -> ours agrees


def _rotary_probe(original) -> bool:
    """:func:`_fast_rotary_for` agrees with ``original`` on the calls it takes over: outputs (values and dtype) and
    gradients of a query and key of grouped heads, random tables whose halves differ, ``[B, H, T, D]`` and (with
    ``unsqueeze_dim=2``) ``[B, T, H, D]``, fp32 and a bf16 query against fp32 tables. Once per function."""
    try:
        if original in _ROTARY_PROBE:
            return _ROTARY_PROBE[original]
    except TypeError:  # not weakly referable: probed each time
        pass
    ok = False
    try:
        fast = _fast_rotary_for(original)
        g = torch.Generator().manual_seed(0)
        q, k = torch.randn(2, 4, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g)
        cos, sin = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
        cases = [((q, k), {}, _TOL), ((q.transpose(1, 2), k.transpose(1, 2)), {"unsqueeze_dim": 2}, _TOL),
                 ((q.bfloat16(), k.bfloat16()), {}, 2.0**-6)]
        ok = True
        for (q0, k0), kw, tol in cases:
            outs = []
            for f in (original, fast):
                qi, ki = q0.clone().requires_grad_(True), k0.clone().requires_grad_(True)
                a, b = f(qi, ki, cos, sin, **kw)
                wa = torch.randn(a.shape, generator=torch.Generator().manual_seed(1)).to(a.dtype)
                gq, gk = torch.autograd.grad((a * wa).sum() + (b * b).sum(), [qi, ki])
                outs.append([a.detach(), b.detach(), gq, gk])
            ok = ok and _agree(*outs, tol=tol)
    except Exception as e:  # any failure: transformers' own function stays
        log.debug("rotary probe failed for %s: %s", getattr(original, "__module__", original), e)
        ok = False
    try:
        _ROTARY_PROBE[original] = ok
    except TypeError:
        pass
    return ok


@contextlib.contextmanager
def fast_rotary(enabled: bool = True) -> Iterator[None]:
    """Inside the block, the ``apply_rotary_pos_emb`` of every loaded transformers modeling module that passes
    :func:`_rotary_probe` runs through :class:`_Rotary` (looked up at each call by the attention modules, so every
    model of such a class in the process gets it, as with :func:`exoalign.attention.training_attention`, which
    enters this block). Restored on exit."""
    if not enabled:
        yield
        return
    patched = []
    for name, mod in list(sys.modules.items()):
        if not name.startswith("transformers.models.") or mod is None:
            continue
        original = mod.__dict__.get("apply_rotary_pos_emb")
        if original is None or hasattr(original, "_exoalign_original") or not callable(original):
            continue
        if _rotary_probe(original):
            mod.apply_rotary_pos_emb = _fast_rotary_for(original)
            patched.append((mod, original))
    try:
        yield
    finally:
        for mod, original in patched:
            mod.apply_rotary_pos_emb = original
