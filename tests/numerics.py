"""Numeric comparisons whose tolerance follows from the computation, not from one machine's rounding.

Two computations of the same quantity in floating point (another summation order, another kernel path:
``ATEN_CPU_CAPABILITY=default|avx2|avx512``, another CPU) differ by rounding. For a value accumulated over
``n`` terms of magnitude up to ``M`` in a format with machine epsilon ``u`` the difference is bounded by about
``n·u·M`` (worst case) and is typically ``√n·u·M``. So a tolerance is stated

* **relative to the tensor's scale** (its largest magnitude), never as a bare absolute number next to values
  of unknown size: a gradient element that is 1e-9 where others are 1e-1 carries the rounding of the large
  ones; and
* from **the dtype and the reduction length**: :func:`rel_tol`.

:func:`assert_close_scaled` compares ``|a − e| ≤ tol · scale`` elementwise (``scale`` = max |e|, at least
``tiny``) and on failure names the worst element, where it is, both values, the tolerance and how many
elements are off.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

EPS = {torch.float64: 2.0**-52, torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def rel_tol(dtype: torch.dtype, n: int, safety: float = 16.0) -> float:
    """``safety · eps(dtype) · √n``: the typical rounding of a length-``n`` reduction, with headroom.

    ``safety`` absorbs the depth of the computation (a backward pass chains several reductions) and the
    gap between the typical and the worst case; tests say why they pick theirs.
    """
    return safety * EPS[dtype] * math.sqrt(max(n, 1))


def _describe(a: torch.Tensor, e: torch.Tensor, tol: float, scale: float, what: str) -> str | None:
    diff = (a - e).abs()
    bound = tol * scale
    bad = ~(diff <= bound)  # NaN counts as bad
    if not bool(bad.any()):
        return None
    flat = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff).flatten()
    k = int(flat.argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(k), diff.shape)) if diff.dim() else ()
    return (
        f"{what or 'tensor'}: {int(bad.sum())} of {diff.numel()} element(s) differ by more than "
        f"tol·scale = {tol:.3g}·{scale:.3g} = {bound:.3g}; worst at index {idx}: actual {a.flatten()[k].item():.9g}, "
        f"expected {e.flatten()[k].item():.9g}, |diff| {flat[k].item():.3g} "
        f"({flat[k].item() / scale if scale else float('inf'):.3g} of scale)"
    )


def assert_close_scaled(
    actual: torch.Tensor | Mapping[str, torch.Tensor] | float,
    expected: torch.Tensor | Mapping[str, torch.Tensor] | float,
    tol: float,
    *,
    scale: float | None = None,
    tiny: float = 1e-30,
    what: str = "",
) -> None:
    """Assert ``|actual − expected| ≤ tol · scale`` everywhere, ``scale`` = max |expected| (or given).

    Mappings (e.g. parameter name → gradient) are compared key by key, each against its own scale; the keys
    must match. Shapes must match exactly (no broadcasting).
    """
    if isinstance(expected, Mapping):
        assert isinstance(actual, Mapping), f"{what}: expected a mapping, got {type(actual).__name__}"
        assert set(actual) == set(expected), f"{what}: keys differ: {sorted(set(actual) ^ set(expected))}"
        errors = []
        for key in expected:
            try:
                assert_close_scaled(actual[key], expected[key], tol, scale=scale, tiny=tiny,
                                    what=f"{what}[{key}]" if what else str(key))
            except AssertionError as err:
                errors.append(str(err))
        assert not errors, "\n".join(errors)
        return
    a = torch.as_tensor(actual).detach().to(torch.float64)
    e = torch.as_tensor(expected).detach().to(torch.float64)
    assert a.shape == e.shape, f"{what or 'tensor'}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    if scale is None:
        finite = e[torch.isfinite(e)]
        scale = float(finite.abs().max()) if finite.numel() else 1.0
    scale = max(float(scale), tiny)
    both_inf = torch.isinf(a) & torch.isinf(e) & (torch.sign(a) == torch.sign(e))
    if bool(both_inf.any()):
        a, e = a.clone(), e.clone()
        a[both_inf] = 0.0
        e[both_inf] = 0.0
    message = _describe(a, e, tol, scale, what)
    assert message is None, message
