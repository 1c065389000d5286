"""The loss library: pure functions of grouped sequence log-probs, picked by name from a registry.

>>> from exoalign.losses import get_loss, pref_targets
>>> loss_fn = get_loss("exo")
>>> out = loss_fn(policy_logps, ref_logps, pref_targets(len(policy_logps), 1e-3), beta_pi=0.1)
>>> out.losses.mean().backward()

Online (completions sampled from the current policy π_t): ``online_targets(rewards, log π_t, log π_sft, β_π, β_r,
mask)`` gives the corrected reference and targets for exo/dpo and the KL-shaped reward for ``rloo`` and ``ppo``
(which also takes the sampler's log-probs ``log π_t`` for its ratio).

See ``core.py`` for the equations and papers, and ``docs/losses.md`` for when to use which. The trainer knows no loss formula: it asks :func:`get_loss`
and reads the attributes :func:`loss_info` returns (whether the loss needs the reference model, completion
lengths, and which parameters of its own it takes, set by ``loss.params``). The registry (``registry.py``) is the
only list of losses: :func:`register_loss` adds a user's own.
"""

from __future__ import annotations

from collections.abc import Callable

from .core import LossOutput, cdpo, dpo, exo, hinge, ipo, ppo, rloo, rpo, simpo
from .registry import (
    BATCH_PARAMS,
    LOSSES,
    LossInfo,
    check_params,
    register_loss,
    resolve_loss,
)
from .registry import _builtin as _register_builtin
from .targets import (
    NEG,
    OnlineTargets,
    check_eps,
    ess,
    masked_log_softmax,
    online_targets,
    pref_targets,
    reward_targets,
)

_register_builtin("exo", exo, needs_ref=True, listwise=True)
_register_builtin("dpo", dpo, needs_ref=True, listwise=True)
_register_builtin("ipo", ipo, needs_ref=True, listwise=False)
_register_builtin("cdpo", cdpo, needs_ref=True, listwise=False)
_register_builtin("simpo", simpo, needs_ref=False, listwise=False)
_register_builtin("rpo", rpo, needs_ref=True, listwise=False)
_register_builtin("hinge", hinge, needs_ref=True, listwise=False)
_register_builtin("rloo", rloo, needs_ref=False, listwise=True, online_only=True)
_register_builtin("ppo", ppo, needs_ref=False, listwise=True, online_only=True)


def loss_info(name: str) -> LossInfo:
    """The registry entry for loss ``name`` (or ``file.py:function`` / ``module:function``, imported and
    registered); ConfigError naming the choices if there is none."""
    return resolve_loss(name)


def get_loss(name: str) -> Callable[..., LossOutput]:
    """The loss function registered as ``name`` (``exo``, ``dpo``, ``ipo``, ``cdpo``, ``simpo``, ``rpo``, ``hinge``,
    ``rloo``, ``ppo``, or one added with :func:`register_loss`)."""
    return loss_info(name).fn


__all__ = [
    "BATCH_PARAMS",
    "LOSSES",
    "NEG",
    "LossInfo",
    "LossOutput",
    "OnlineTargets",
    "cdpo",
    "check_eps",
    "check_params",
    "dpo",
    "ess",
    "exo",
    "get_loss",
    "hinge",
    "ipo",
    "loss_info",
    "masked_log_softmax",
    "online_targets",
    "ppo",
    "pref_targets",
    "register_loss",
    "resolve_loss",
    "reward_targets",
    "rloo",
    "rpo",
    "simpo",
]
