"""The loss registry: the only list of losses and of what each needs (reference, lengths, all K, online samples).

Built-in losses register themselves in ``__init__.py``; a user's loss joins with :func:`register_loss`, or by naming
it in a config as ``loss.name=path/to/file.py:function`` or ``loss.name=module:function`` (:func:`resolve_loss`).
Every loss has the built-ins' signature::

    fn(policy_logps [B, K], ref_logps [B, K] | None, target_logprobs [B, K], beta_pi, mask [B, K] | None = None,
       *, <its own keyword-only parameters>) -> LossOutput

Two keyword-only names are filled in by the trainer from the batch (:data:`BATCH_PARAMS`): ``lengths`` (completion
token counts ``[B, K]``), ``shaped_rewards`` (online groups' KL-shaped reward ``[B, K]``) and ``sampler_logps``
(online groups' log-probs under the policy that sampled them, ``[B, K]``). Every other
keyword-only parameter is the loss's own hyper-parameter, set in ``loss.params`` and checked by :func:`check_params`.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, InputError
from ..userspec import import_callable

BATCH_PARAMS = ("lengths", "shaped_rewards", "sampler_logps")
"""Keyword-only parameters the trainer fills from the batch; not hyper-parameters."""

SPEC_FIX = "write loss.name=path/to/file.py:function or module:function (a function with the built-in losses' signature)"


@dataclass(frozen=True)
class LossInfo:
    name: str
    fn: Callable[..., Any]
    needs_ref: bool
    """True when the loss uses the reference log-probs (they are computed, cached or not, only then)."""
    listwise: bool
    """True when the loss uses all K completions and the target distribution (so it also has an online form);
    False when it uses the best/worst pair of each group."""
    online_only: bool = False
    """True when the loss needs samples of the current policy (``shaped_rewards`` from ``online_targets``)."""

    @property
    def params(self) -> list[str]:
        """Names of every keyword-only parameter (the batch's ``lengths``/``shaped_rewards`` and its own)."""
        sig = inspect.signature(self.fn)
        return [p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]

    @property
    def hyper_params(self) -> dict[str, Any]:
        """The loss's own hyper-parameters (``loss.params``) and their defaults (``inspect.Parameter.empty``
        for one that must be given)."""
        sig = inspect.signature(self.fn)
        return {p.name: p.default for p in sig.parameters.values()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in BATCH_PARAMS}

    @property
    def needs_lengths(self) -> bool:
        return "lengths" in self.params

    @property
    def online(self) -> bool:
        """Trains on the importance-corrected online groups (``online.rounds >= 1``)."""
        return self.listwise or self.online_only


LOSSES: dict[str, LossInfo] = {}
"""Every registered loss by name (the built-ins first)."""
BUILTIN: set[str] = set()


def _check_signature(name: str, fn: Callable[..., Any]) -> None:
    if not callable(fn):
        raise ConfigError(f"loss {name!r} is not callable", field="loss.name", fix=SPEC_FIX)
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin or C function: trust it
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    extra = [p for p in list(sig.parameters.values())[5:] if p.kind in positional and p.default is p.empty]
    try:
        sig.bind_partial(None, None, None, 0.1, None)  # keyword-only parameters are checked by check_params
        if extra:
            raise TypeError
    except TypeError:
        raise ConfigError(
            f"loss {name!r} cannot be called as fn(policy_logps, ref_logps, target_logprobs, beta_pi, mask)",
            field="loss.name", fix="give it the built-in losses' signature: fn(policy_logps, ref_logps, "
            "target_logprobs, beta_pi, mask=None, *, <its own parameters>) -> exoalign.losses.LossOutput") from None


def register_loss(name: str, fn: Callable[..., Any], *, needs_ref: bool = True, listwise: bool = True,
                  online_only: bool = False) -> Callable[..., Any]:
    """Add ``fn`` to the registry as ``name`` (so ``loss.name=name`` trains with it); returns ``fn``.

    ``needs_ref``: the loss uses ``ref_logps`` (False: the trainer passes None and computes no reference).
    ``listwise``: it uses all K completions and the targets (False: only each group's best/worst pair).
    ``online_only``: it trains only on samples of the current policy (``online.rounds >= 1``).
    Its own hyper-parameters are its keyword-only parameters, set with ``loss.params={...}``. A built-in name
    cannot be replaced; registering a user's name again replaces the earlier function.
    """
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"a loss name must be a non-empty string (got {name!r})", field="loss.name",
                          fix="register_loss('my_loss', fn)")
    if name in BUILTIN and LOSSES[name].fn is not fn:
        raise ConfigError(f"{name!r} is a built-in loss", field="loss.name", fix="register yours under another name")
    _check_signature(name, fn)
    LOSSES[name] = LossInfo(name, fn, needs_ref=bool(needs_ref), listwise=bool(listwise), online_only=bool(online_only))
    return fn


def _builtin(name: str, fn: Callable[..., Any], **caps: bool) -> None:
    register_loss(name, fn, **caps)
    BUILTIN.add(name)


def is_spec(name: str) -> bool:
    """``file.py:function`` or ``module:function`` (what :func:`resolve_loss` imports)."""
    return ":" in name and not name.startswith(":") and not name.endswith(":")


def _import_spec(spec: str) -> Callable[..., Any]:
    return import_callable(spec, what="loss", field="loss.name", fix=SPEC_FIX, error_type=ConfigError)


def resolve_loss(name: str) -> LossInfo:
    """The entry for ``name``: a registered loss, or ``file.py:function`` / ``module:function`` imported and
    registered under that spec. Capabilities of an imported function come from its attributes ``needs_ref``,
    ``listwise``, ``online_only`` (defaults True, True, False). ConfigError naming the choices otherwise."""
    if name in LOSSES:
        return LOSSES[name]
    if is_spec(name):
        fn = _import_spec(name)
        register_loss(name, fn, needs_ref=getattr(fn, "needs_ref", True), listwise=getattr(fn, "listwise", True),
                      online_only=getattr(fn, "online_only", False))
        return LOSSES[name]
    close = difflib.get_close_matches(str(name), list(LOSSES), n=1)
    choices = f"one of {', '.join(LOSSES)}, or path/to/file.py:function / module:function"
    fix = f"did you mean '{close[0]}'? (use {choices})" if close else f"use {choices}"
    raise ConfigError(f"unknown loss {name!r}", field="loss.name", fix=fix)


def check_params(info: LossInfo, params: Mapping[str, Any]) -> dict[str, Any]:
    """``loss.params`` checked against ``info``'s keyword-only parameters: every key one of them, every value of
    the default's kind (a number where the default is a number), every parameter without a default given.
    Returns a plain dict; ConfigError on ``loss.params.<key>`` otherwise."""
    own = info.hyper_params
    out = {}
    for key, value in dict(params).items():
        field = f"loss.params.{key}"
        if key in BATCH_PARAMS:
            raise ConfigError(f"{key!r} is filled in from the batch, not set", field=field, fix=f"remove {key}")
        if key not in own:
            close = difflib.get_close_matches(str(key), list(own), n=1)
            have = f"its parameters: {', '.join(own)}" if own else "it takes no parameters of its own"
            raise ConfigError(f"loss {info.name!r} has no parameter {key!r}", field=field,
                              fix=f"did you mean '{close[0]}'?" if close else have)
        default = own[key]
        number = isinstance(default, (int, float)) and not isinstance(default, bool)
        if number:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"must be a finite number (got {value!r})", field=field,
                                  fix=f"write a number such as {default}")
            value = type(default)(value) if isinstance(default, float) else value
        out[key] = value
    missing = [k for k, d in own.items() if d is inspect.Parameter.empty and k not in out]
    if missing:
        raise ConfigError(f"loss {info.name!r} needs {', '.join(missing)}", field="loss.params",
                          fix="set loss.params={" + ", ".join(f"{k}: ..." for k in missing) + "}")
    if info.name in BUILTIN:  # a user's function may have side effects: it runs first at the first step
        _probe(info, out)
    return out


def _probe(info: LossInfo, params: dict[str, Any]) -> None:
    """One call of a built-in loss on a dummy pair, so that a value the loss itself rejects (cdpo's label_smoothing outside (0, ½),
    …) fails with the config, before any model is loaded. Only the loss's own InputError is reported here."""
    import torch

    from .targets import pref_targets

    zeros = torch.zeros(1, 2, dtype=torch.float64)  # (B=1, K=2)
    batch = {"lengths": torch.ones(1, 2), "shaped_rewards": zeros, "sampler_logps": zeros}
    kwargs = {k: batch[k] for k in info.params if k in batch}
    try:
        info.fn(zeros, zeros, pref_targets(1, 0.1, dtype=torch.float64), 0.1, None, **kwargs, **params)
    except InputError as e:
        key = e.field if e.field in params else None
        raise ConfigError(e.message, field=f"loss.params.{key}" if key else "loss.params", fix=e.fix) from None
    except Exception:  # noqa: BLE001 - anything else surfaces, with its traceback, at the first training step
        pass
