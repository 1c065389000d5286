"""Target distributions over the K completions of a prompt, as log-probabilities.

* preference labels (chosen, rejected): ``q = [1 − ε, ε]`` — :func:`pref_targets`
* reward labels ``r_1..r_K``: ``q = softmax(r / β_r)`` over the valid completions — :func:`reward_targets`
* completions sampled from any policy μ (online: the current policy): the importance-corrected targets and
  reference — :func:`online_targets` (μ = π_sft gives :func:`reward_targets` exactly)

Invalid (padding) slots get a very negative finite log-probability, :data:`NEG`, so that every quantity
downstream stays finite; losses additionally zero their contribution with the mask.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..errors import ConfigError

#: log-probability given to masked-out slots: exp(NEG) == 0 in fp32/bf16 yet NEG − NEG is finite.
NEG = -1e30


def check_eps(eps: float, field: str = "eps") -> float:
    """Validate a label-smoothing ε for preference targets: it must lie in the open interval (0, ½).

    ``field`` names the config key in the error (``eps`` for targets, ``label_smoothing`` for cdpo).
    """
    if (
        not isinstance(eps, (int, float))
        or isinstance(eps, bool)
        or not math.isfinite(eps)
        or not 0.0 < eps < 0.5
    ):
        raise ConfigError(
            f"label smoothing {field} must be in (0, 0.5), got {eps!r}",
            field=field,
            fix="EXO needs eps > 0 (log 0 is undefined); use 1e-3 as recommended, or sigmoid(-10) for the authors' value",
        )
    return float(eps)


def pref_targets(
    batch_size: int,
    eps: float,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Log-targets ``log[1 − ε, ε]`` for preference pairs; column 0 is the chosen completion.

    Returns a ``[batch_size, 2]`` tensor. ε must be in (0, ½): ε = 0 makes the reverse KL of EXO infinite,
    ε ≥ ½ no longer prefers the chosen completion.
    """
    eps = check_eps(eps)
    row = torch.tensor([math.log1p(-eps), math.log(eps)], dtype=dtype, device=device)
    return row.expand(batch_size, 2).clone()  # (B, 2)


def masked_log_softmax(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``log_softmax`` over the last dim restricted to ``mask`` (True = valid); invalid slots get :data:`NEG`."""
    if mask is None:
        return torch.log_softmax(logits, dim=-1)
    mask = mask.to(torch.bool)
    filled = logits.masked_fill(~mask, NEG)  # (B, K)
    out = torch.log_softmax(filled, dim=-1)
    return out.masked_fill(~mask, NEG)


def _check_beta(value: float, field: str) -> float:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0):
        raise ConfigError(
            f"{field} must be > 0, got {value!r}", field=field, fix="use a positive temperature such as 0.1"
        )
    return float(value)


def reward_targets(rewards: torch.Tensor, beta_r: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Log-targets ``log_softmax(r / β_r)`` over the valid completions of each group.

    ``rewards``: ``[B, K]``; ``mask``: ``[B, K]`` bool (True = valid completion). Returns ``[B, K]``; invalid
    slots hold :data:`NEG`. Rewards in masked slots are ignored (they may be NaN padding).
    """
    _check_beta(beta_r, "beta_r")
    # Integer or half-precision rewards: r / β_r with a small β_r needs float32 resolution.
    rewards = rewards if rewards.dtype in (torch.float32, torch.float64) else rewards.float()
    if mask is not None:
        rewards = rewards.masked_fill(~mask.to(device=rewards.device, dtype=torch.bool), 0.0)
    return masked_log_softmax(rewards / beta_r, mask)


class OnlineTargets(NamedTuple):
    """What :func:`online_targets` returns; every field is ``[B, K]``, detached, float32 or float64."""

    ref_logps: torch.Tensor
    """Corrected reference ``log π_sft + (log μ − log π_sft)/β_π``: pass it as ``ref_logps`` to exo/dpo."""
    target_logprobs: torch.Tensor
    """``log q = log_softmax(r/β_r − (log μ − log π_sft))`` over valid slots; :data:`NEG` in padding."""
    shaped_rewards: torch.Tensor
    """KL-shaped reward ``r − β (log μ − log π_sft)`` with ``β = β_π β_r`` (0 in padding): rloo's input."""


def online_targets(
    rewards: torch.Tensor,
    sampler_logps: torch.Tensor,
    sft_logps: torch.Tensor,
    beta_pi: float,
    beta_r: float,
    mask: torch.Tensor | None = None,
) -> OnlineTargets:
    """Targets and reference for K completions sampled from a policy μ, self-normalised over each group.

    With ``d = log μ − log π_sft`` (sequence log-probs at the loss temperature, ``[B, K]`` each)::

        ref    = log π_sft + d / β_π        so that  β_π (log π_θ − ref) = β_π (log π_θ − log π_sft) − d
        log q  = log_softmax(r / β_r − d)   over the valid completions
        shaped = r − β_π β_r d              (the KL-shaped reward of RLHF, for rloo)

    The ``−d`` on both sides are the importance weights π_sft/μ of the self-normalised estimates, so as
    K → ∞ EXO on (ref, q) tends to ``KL(π_θ^{β_π} ‖ π*_{β_r})`` whatever μ sampled the group (see
    docs/online.md). μ = π_sft (``d = 0``) gives ``ref = log π_sft`` and :func:`reward_targets` exactly.
    ``sampler_logps`` must be the log-probs of the distribution actually sampled. Padding slots (``mask``
    False) are never read: they may hold NaN.
    """
    beta_pi, beta_r = _check_beta(beta_pi, "beta_pi"), _check_beta(beta_r, "beta_r")
    f = (lambda x: x if x.dtype in (torch.float32, torch.float64) else x.float())  # noqa: E731
    rewards, sampler_logps, sft_logps = f(rewards.detach()), f(sampler_logps.detach()), f(sft_logps.detach())
    if mask is not None:
        mask = mask.to(device=rewards.device, dtype=torch.bool)
        rewards = rewards.masked_fill(~mask, 0.0)
        sampler_logps, sft_logps = sampler_logps.masked_fill(~mask, 0.0), sft_logps.masked_fill(~mask, 0.0)
    d = sampler_logps - sft_logps  # (B, K) log μ/π_sft, 0 in padding
    return OnlineTargets(
        ref_logps=sft_logps + d / beta_pi,
        target_logprobs=masked_log_softmax(rewards / beta_r - d, mask),
        shaped_rewards=rewards - beta_pi * beta_r * d,
    )


def ess(log_p: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Effective sample size of a group distribution as a fraction of its size: ``(1/Σ p²) / n`` ``[B]``.

    ``log_p``: ``[B, K]`` log-probabilities normalised over the valid slots (a loss's ``p`` or ``q``);
    ``n`` is the number of valid slots. 1 for a uniform p, 1/n when p sits on one completion.
    """
    mask = torch.ones_like(log_p, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    p = log_p.detach().exp().masked_fill(~mask, 0.0)  # (B, K)
    return 1.0 / (p.pow(2).sum(-1) * mask.sum(-1).clamp(min=1))
