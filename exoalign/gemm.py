"""fp32 dense products through oneDNN where its kernels beat torch's default BLAS (AMD EPYC with AVX-512).

torch's CPU wheels multiply fp32 matrices with MKL. On AMD processors MKL does not take its AVX-512 code path;
oneDNN (also inside torch, ``torch.ops.mkldnn._linear_pointwise``) does. Measured on an AMD EPYC Zen 4 (2 cores,
interleaved, ``benchmarks/gemm_backends.py``, docs/speed.md "A ninth stop"): a SmolLM2 layer's forward and
input-gradient (``dy W``) products with 1 536 rows run 1.07-1.14× MKL's rate when MKL runs well (180-195 →
199-216 GFLOP/s) and ~1.3-1.5× when it does not (120-150 → 183-198, in slower phases of the VM); the SmolLM2
training step 7.87 → 7.42 s. The weight-gradient product (``dyᵀ x``) is slower through oneDNN (0.87-1.03×), so
that one stays with torch.

:func:`linear` is ``F.linear`` with the forward and the input gradient through oneDNN when :func:`use_onednn`
holds and the call is an fp32 CPU product of at least :data:`MIN_ROWS` rows and :data:`MIN_OUTPUTS` output
elements, outside autocast and compilation;
every other call is ``F.linear`` itself. :func:`apply_fast_linear` points a model's ``nn.Linear`` modules at it
(the weights, state dict and ``save_pretrained`` are untouched); :func:`remove_fast_linear` undoes it. The two
kernels sum in different orders, so values differ by fp32 rounding (relative ~1e-6), as between CPUs; and since the
kernel depends on a product's rows, a row's last bits can depend on the batch it is computed in (MKL's own
kernels can do the same).

Which backend: the environment variable :data:`ENV` — ``auto`` (the default: oneDNN on AMD processors with
AVX-512, where it was measured faster; torch's default elsewhere, Intel and AVX2-only AMD included, where it was
not measured), ``onednn`` or ``aten`` (torch's own choice everywhere).
"""

from __future__ import annotations

import functools
import os
import weakref
from typing import Any

import torch
import torch.nn.functional as F

from .errors import InputError

ENV = "EXOALIGN_FP32_MATMUL"
CHOICES = ("auto", "onednn", "aten")
MIN_ROWS = 8
MIN_OUTPUTS = 1 << 16
"""Rows (tokens) and output elements (rows × outputs) from which a product goes through oneDNN. Below them the
two are close or oneDNN loses (one decoded row: 2-15 GFLOP/s against 17-22; 72 rows × 192 outputs: 36 against
56); above, oneDNN won at every SmolLM2 shape measured (8 rows × 49 152 vocabulary: 50 against 22; 1 016 rows ×
192: 182 against 130; docs/speed.md)."""


def _cpu_info() -> tuple[str, set[str]]:
    """The CPU's vendor and flags from ``/proc/cpuinfo`` (Linux; empty elsewhere)."""
    vendor, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "vendor_id" and not vendor:
                    vendor = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
                if vendor and flags:
                    break
    except OSError:
        pass
    return vendor, flags


def _onednn_available() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def choice(environ: dict | None = None) -> str:
    """The backend asked for in :data:`ENV` (``auto`` when unset); a bad value is an :class:`InputError`."""
    value = (os.environ if environ is None else environ).get(ENV, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise InputError(f"unknown fp32 matmul backend {value!r}", field=ENV,
                         fix=f"set {ENV} to one of {', '.join(CHOICES)} (or unset it)")
    return value


@functools.cache
def _decide(value: str) -> bool:
    if value == "aten" or not _onednn_available():
        return False
    if value == "onednn":
        return True
    vendor, flags = _cpu_info()
    return vendor == "AuthenticAMD" and "avx512f" in flags


def use_onednn() -> bool:
    """Whether fp32 CPU products of :func:`linear` go through oneDNN in this process (module docstring)."""
    return _decide(choice())


def _lin(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x2 Wᵀ (+ b)`` for a 2-D ``x2`` through oneDNN (no autograd)."""
    return torch.ops.mkldnn._linear_pointwise(x2, weight, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """``y = x Wᵀ + b`` with the forward and ``dx = dy W`` through oneDNN, ``dW = dyᵀ x`` through torch."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        x2 = x.reshape(-1, x.shape[-1])
        return _lin(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        dx = dw = db = None
        if need_x:
            dx = _lin(g2, weight.t()).view(*x.shape)
        if need_w:
            dw = g2.t() @ x.reshape(-1, x.shape[-1])
        if need_b and ctx.has_bias:
            db = g2.sum(0)
        return dx, dw, db


def _eligible(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and weight.dim() == 2 and x.dim() >= 2 and (bias is None or bias.dtype == torch.float32)
            and x.shape[-1] > 0 and (rows := x.numel() // x.shape[-1]) >= MIN_ROWS
            and rows * weight.shape[0] >= MIN_OUTPUTS
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling() and use_onednn())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through oneDNN where :func:`use_onednn` and the call qualifies."""
    if not _eligible(x, weight, bias):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _OneDNNLinear.apply(x, weight, bias)
    return _lin(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])


class ModuleForward:
    """A ``forward`` set on one module instance, reaching its module through a weak reference.

    A strong reference would make module → forward → module a reference cycle, which only Python's cyclic
    collector frees: every dropped model (a sampling copy per online round, a checkpoint loaded per evaluation)
    would keep its weights until a full collection, and an online run's memory grew by a sampling copy per round
    (docs/speed.md). Pickling and ``copy.deepcopy`` rebuild it around the copied module (:meth:`__reduce__`), so a
    patched model still pickles and a deep copy's layers read their own weights (any other state of a subclass is
    not carried over: it must be one the subclass can rebuild). Subclasses implement ``__call__``."""

    def __init__(self, module: torch.nn.Module) -> None:
        self._module = weakref.ref(module)

    @property
    def module(self) -> Any:
        module = self._module()
        if module is None:
            raise RuntimeError(f"{type(self).__name__}: its module was freed (a forward taken from a dropped model)")
        return module

    def __reduce__(self) -> tuple:
        return type(self), (self.module,)


class _LinearForward(ModuleForward):
    """The ``forward`` :func:`apply_fast_linear` gives one ``nn.Linear``: :func:`linear` of its weight and bias."""

    def __call__(self, x: torch.Tensor) -> Any:
        module = self.module
        return linear(x, module.weight, module.bias)


def apply_fast_linear(model: torch.nn.Module) -> int:
    """Point the plain ``nn.Linear`` modules of ``model`` (not subclasses: LoRA and quantised layers keep their
    code) at :func:`linear`; returns how many. Idempotent; does nothing (0) where :func:`use_onednn` is false."""
    if not use_onednn():
        return 0
    n = 0
    for m in model.modules():
        if type(m) is torch.nn.Linear and "forward" not in m.__dict__:
            m.forward = _LinearForward(m)
            m._fast_linear = True
            n += 1
    return n


def remove_fast_linear(model: torch.nn.Module) -> None:
    """Undo :func:`apply_fast_linear`: every ``nn.Linear`` runs its class's forward again."""
    for m in model.modules():
        if m.__dict__.pop("_fast_linear", None):
            m.__dict__.pop("forward", None)
