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
lengths, and which extra parameters it takes).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ConfigError
from .core import LossOutput, cdpo, dpo, exo, hinge, ipo, ppo, rloo, rpo, simpo
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


@dataclass(frozen=True)
class LossInfo:
    name: str
    fn: Callable[..., LossOutput]
    needs_ref: bool
    needs_lengths: bool
    listwise: bool
    """True when the loss uses all K completions; False when it uses the best/worst pair of each group."""
    online_only: bool = False
    """True when the loss needs samples of the current policy (``shaped_rewards`` from ``online_targets``; ppo
    also the sampler's log-probs ``sampler_logps``)."""

    @property
    def params(self) -> list[str]:
        """Names of the keyword-only parameters (``label_smoothing``, ``gamma``, ``alpha``, ``lengths``,
        ``shaped_rewards``, ``sampler_logps``, ``clip``)."""
        sig = inspect.signature(self.fn)
        return [p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]


LOSSES: dict[str, LossInfo] = {
    "exo": LossInfo("exo", exo, needs_ref=True, needs_lengths=False, listwise=True),
    "dpo": LossInfo("dpo", dpo, needs_ref=True, needs_lengths=False, listwise=True),
    "ipo": LossInfo("ipo", ipo, needs_ref=True, needs_lengths=False, listwise=False),
    "cdpo": LossInfo("cdpo", cdpo, needs_ref=True, needs_lengths=False, listwise=False),
    "simpo": LossInfo("simpo", simpo, needs_ref=False, needs_lengths=True, listwise=False),
    "rpo": LossInfo("rpo", rpo, needs_ref=True, needs_lengths=True, listwise=False),
    "hinge": LossInfo("hinge", hinge, needs_ref=True, needs_lengths=False, listwise=False),
    "rloo": LossInfo("rloo", rloo, needs_ref=False, needs_lengths=False, listwise=True, online_only=True),
    "ppo": LossInfo("ppo", ppo, needs_ref=False, needs_lengths=False, listwise=True, online_only=True),
}


def loss_info(name: str) -> LossInfo:
    """The registry entry for loss ``name``; ConfigError naming the choices if there is none."""
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}", field="loss", fix=f"use one of {', '.join(LOSSES)}")
    return LOSSES[name]


def get_loss(name: str) -> Callable[..., LossOutput]:
    """The loss function registered as ``name`` (``exo``, ``dpo``, ``ipo``, ``cdpo``, ``simpo``, ``rpo``, ``hinge``,
    ``rloo``, ``ppo``)."""
    return loss_info(name).fn


__all__ = [
    "LOSSES",
    "NEG",
    "LossInfo",
    "LossOutput",
    "OnlineTargets",
    "cdpo",
    "check_eps",
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
    "reward_targets",
    "rloo",
    "rpo",
    "simpo",
]
