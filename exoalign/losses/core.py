"""Alignment losses as pure functions of grouped sequence log-probabilities.

Every loss has the signature ``loss(policy_logps, ref_logps, target_logprobs, beta_pi, mask=None, **params)``:

* ``policy_logps``, ``ref_logps``: ``[B, K]`` summed completion log-probs under π_θ and π_sft
* ``target_logprobs``: ``[B, K]`` log-target distribution over the K completions (see ``targets.py``); for
  preference pairs column 0 is the chosen completion
* ``mask``: ``[B, K]`` bool, True where a completion exists (groups may have different K)

and returns a :class:`LossOutput` ``(losses [B], rewards [B, K], metrics)``: unreduced per-group losses (the
caller reduces), the detached implicit rewards ``β_π (log π_θ − log π_sft)`` and a dict of scalar metrics.

Conventions shared by all losses:

* Half-precision inputs (bf16/fp16) are computed in float32: sequence log-probs are sums of hundreds of
  token terms, and the softmax over a group needs more mantissa than bf16 has. Gradients flow back in the
  input dtype.
* Values in masked slots are never read (they may be NaN or ±inf padding); a masked slot gets no gradient.
* A group with fewer than two valid completions has nothing to compare: its loss is exactly 0 (for EXO and
  DPO this follows from the formula, p = q = [1]; the pairwise losses enforce it).

Pairwise losses (ipo, cdpo, simpo, rpo, hinge) use the best and the worst valid completion of each group by
target probability as chosen and rejected; on preference pairs these are columns 0 and 1.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .targets import NEG, check_eps, masked_log_softmax


class LossOutput(NamedTuple):
    losses: torch.Tensor  # (B,)
    rewards: torch.Tensor  # (B, K), detached
    metrics: dict[str, torch.Tensor]


# ------------------------------------------------------------------------------------------- helpers
def _f32(x: torch.Tensor) -> torch.Tensor:
    """Upcast half-precision tensors to float32 (differentiably); leave fp32/fp64 alone."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _full_mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return (
        torch.ones_like(x, dtype=torch.bool) if mask is None else mask.to(device=x.device, dtype=torch.bool)
    )


def _log_ratio(
    policy_logps: torch.Tensor, ref_logps: torch.Tensor | None, mask: torch.Tensor
) -> torch.Tensor:
    """``h = log π_θ − log π_sft`` (or ``log π_θ`` without a reference) with padding slots set to 0.

    ``masked_fill`` rather than multiplication by the mask, so NaN/inf padding neither leaks into the
    value nor into the gradient. Shape (B, K).
    """
    h = _f32(policy_logps) if ref_logps is None else _f32(policy_logps) - _f32(ref_logps)
    return h.masked_fill(~mask, 0.0)


def _targets(target_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Log-targets in float32 with padding slots at :data:`NEG` (so exp() is exactly 0). Shape (B, K)."""
    return _f32(target_logprobs).masked_fill(~mask, NEG)


def _best_worst(target_logprobs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``[B]`` of the completion with the highest and the lowest target probability among valid ones."""
    t = _f32(target_logprobs.detach())
    best = t.masked_fill(~mask, float("-inf")).argmax(dim=-1)
    worst = t.masked_fill(~mask, float("inf")).argmin(dim=-1)
    return best, worst


def _pick(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(-1, idx.unsqueeze(-1)).squeeze(-1)  # (B, K) → (B,)


def _metrics(
    rewards: torch.Tensor, target_logprobs: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``rewards/{chosen,rejected,margins,accuracies}`` from the best and worst completion by target."""
    best, worst = _best_worst(target_logprobs, mask)
    chosen, rejected = _pick(rewards, best), _pick(rewards, worst)
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "rewards/accuracies": (chosen > rejected).float().mean(),
    }


def _pair_margin(
    h: torch.Tensor, target_logprobs: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``h_w − h_l`` for the best/worst completion by target, the best index, and which groups have a pair.

    ``h``: (B, K) already masked. Returns three (B,) tensors.
    """
    best, worst = _best_worst(target_logprobs, mask)
    has_pair = mask.sum(-1) >= 2
    return _pick(h, best) - _pick(h, worst), best, has_pair


def _only_pairs(losses: torch.Tensor, has_pair: torch.Tensor) -> torch.Tensor:
    # torch.where, not multiplication: a group without a pair must give exactly 0 and no gradient.
    return torch.where(has_pair, losses, torch.zeros_like(losses))


# -------------------------------------------------------------------------------------- listwise
def exo(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    target_logprobs: torch.Tensor,
    beta_pi: float,
    mask: torch.Tensor | None = None,
) -> LossOutput:
    """EXO: reverse KL from the policy's to the target distribution over the K completions.

    Ji et al., "Towards Efficient Exact Optimization of Language Model Alignment", ICML 2024,
    https://arxiv.org/abs/2402.00856 (Sec. 3). With ``h_i = log π_θ(y_i|x) − log π_sft(y_i|x)``::

        p = softmax(β_π h)          (policy's distribution over the K samples)
        L = KL(p ‖ q) = Σ_i p_i (log p_i − log q_i)

    With q = softmax(r / β_r) and y_i ~ π_sft, the gradient of L tends (K → ∞) to the gradient of
    ``KL(π_θ^{β_π} ‖ π*_{β_r})`` where ``π_θ^{β_π} ∝ π_sft (π_θ/π_sft)^{β_π}`` and ``π*_{β_r} ∝ π_sft
    exp(r/β_r)``: EXO is mode-seeking like RL (``tests/test_loss_theorem.py`` checks this). Both sides reach
    their minimum at the RL optimum with KL coefficient β = β_π β_r when the policy can represent it; when it
    cannot, the limit equals the RL objective's gradient only for β_π = 1 (for other β_π it is the reverse KL
    of the tempered ``π_θ^{β_π}``), so prefer β_π = 1 with reward targets (see docs/exact_benchmark.md). With preference targets q = [1 − ε, ε] it is TRL's
    ``exo_pair``; unnormalised log-targets (the authors' ``[0, −10]``) shift L by a constant only.
    """
    mask = _full_mask(policy_logps, mask)
    logits = beta_pi * _log_ratio(policy_logps, ref_logps, mask)  # (B, K)
    log_p = masked_log_softmax(logits, mask)  # (B, K), NEG in padding
    log_q = _targets(target_logprobs, mask)
    # Padding: p = exp(NEG) = 0 and log_p − log_q = 0, and torch.where keeps even that out of the graph.
    terms = torch.where(mask, log_p.exp() * (log_p - log_q), torch.zeros_like(log_p))  # (B, K)
    rewards = logits.detach()
    return LossOutput(terms.sum(-1), rewards, _metrics(rewards, target_logprobs, mask))


def dpo(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    target_logprobs: torch.Tensor,
    beta_pi: float,
    mask: torch.Tensor | None = None,
) -> LossOutput:
    """DPO: forward KL (cross-entropy) from the target to the policy's distribution over the K completions.

    Rafailov et al., "Direct Preference Optimization", NeurIPS 2023, https://arxiv.org/abs/2305.18290; the
    listwise form with reward targets is "DPO-rw" of Ji et al. 2024 (Sec. 4)::

        L = −Σ_i q_i log p_i,    p = softmax(β_π h)

    which differs from ``KL(q ‖ p)`` by the target's entropy (a constant). With preference targets
    ``q = [1 − ε, ε]`` and ``z = β_π (h_w − h_l)`` it is ``−log σ(z) + ε z`` exactly, so ε → 0 gives the usual
    ``−log σ(z)`` and ε > 0 is label-smoothed (conservative) DPO. As K → ∞ its gradient tends to that of the
    forward ``KL(π*_{β_r} ‖ π_θ^{β_π})``: mean-seeking.
    """
    mask = _full_mask(policy_logps, mask)
    logits = beta_pi * _log_ratio(policy_logps, ref_logps, mask)  # (B, K)
    log_p = masked_log_softmax(logits, mask)
    q = _targets(target_logprobs, mask).exp()  # (B, K), 0 in padding
    terms = torch.where(mask, -q * log_p, torch.zeros_like(log_p))
    rewards = logits.detach()
    return LossOutput(terms.sum(-1), rewards, _metrics(rewards, target_logprobs, mask))


# -------------------------------------------------------------------------------------- pairwise
def ipo(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    target_logprobs: torch.Tensor,
    beta_pi: float,
    mask: torch.Tensor | None = None,
) -> LossOutput:
    """IPO: squared loss regressing the log-ratio margin to ``1 / (2τ)`` with τ = β_π.

    Azar et al., "A General Theoretical Paradigm to Understand Learning from Human Preferences", AISTATS 2024,
    https://arxiv.org/abs/2310.12036 (eq. 17): ``L = (h_w − h_l − 1/(2β_π))²``. The margin is of summed
    log-probs; TRL divides each log-ratio by its completion length first (pass per-token-averaged log-probs
    to get that variant).
    """
    mask = _full_mask(policy_logps, mask)
    h = _log_ratio(policy_logps, ref_logps, mask)
    margin, _, has_pair = _pair_margin(h, target_logprobs, mask)
    losses = _only_pairs((margin - 1.0 / (2.0 * beta_pi)) ** 2, has_pair)
    rewards = (beta_pi * h).detach()
    return LossOutput(losses, rewards, _metrics(rewards, target_logprobs, mask))


def cdpo(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    target_logprobs: torch.Tensor,
    beta_pi: float,
    mask: torch.Tensor | None = None,
    *,
    label_smoothing: float = 0.1,
) -> LossOutput:
    """Conservative (label-smoothed) DPO on the best/worst pair.

    Mitchell, "A note on DPO with noisy preferences & relationship to IPO", 2023,
    https://ericmitchell.ai/cdpo.pdf: ``L = −(1 − ε) log σ(β_π Δh) − ε log σ(−β_π Δh)`` with ε =
    ``label_smoothing`` in (0, ½). On pairs it equals :func:`dpo` with ``pref_targets(B, ε)``.
    """
    eps = check_eps(label_smoothing, field="label_smoothing")
    mask = _full_mask(policy_logps, mask)
    h = _log_ratio(policy_logps, ref_logps, mask)
    margin, _, has_pair = _pair_margin(h, target_logprobs, mask)
    z = beta_pi * margin
    losses = _only_pairs(-(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z), has_pair)
    rewards = (beta_pi * h).detach()
    return LossOutput(losses, rewards, _metrics(rewards, target_logprobs, mask))


def hinge(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    target_logprobs: torch.Tensor,
    beta_pi: float,
    mask: torch.Tensor | None = None,
) -> LossOutput:
    """Hinge loss on the scaled log-ratio margin (SLiC-style calibration).

    Zhao et al., "SLiC-HF: Sequence Likelihood Calibration with Human Feedback", 2023,
    https://arxiv.org/abs/2305.10425, in the reference-relative form of TRL's ``hinge``:
    ``L = max(0, 1 − β_π Δh)``.
    """
    mask = _full_mask(policy_logps, mask)
    h = _log_ratio(policy_logps, ref_logps, mask)
    margin, _, has_pair = _pair_margin(h, target_logprobs, mask)
    losses = _only_pairs(torch.relu(1.0 - beta_pi * margin), has_pair)
    rewards = (beta_pi * h).detach()
    return LossOutput(losses, rewards, _metrics(rewards, target_logprobs, mask))


def simpo(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    target_logprobs: torch.Tensor,
    beta_pi: float,
    mask: torch.Tensor | None = None,
    *,
    lengths: torch.Tensor,
    gamma: float = 0.5,
) -> LossOutput:
    """SimPO: reference-free, length-normalised margin loss with a target margin γ.

    Meng et al., "SimPO: Simple Preference Optimization with a Reference-Free Reward", NeurIPS 2024,
    https://arxiv.org/abs/2405.14734 (eq. 6)::

        L = −log σ(β (log π(y_w)/|y_w| − log π(y_l)/|y_l|) − γ)

    ``lengths``: ``[B, K]`` completion token counts (clamped to ≥ 1). ``ref_logps`` is ignored (may be None).
    The rewards returned are the length-normalised ``β log π(y)/|y|``.
    """
    mask = _full_mask(policy_logps, mask)
    pol = _log_ratio(policy_logps, None, mask)
    norm = pol / lengths.to(pol.device).clamp(min=1).to(pol.dtype)  # (B, K)
    margin, _, has_pair = _pair_margin(norm, target_logprobs, mask)
    losses = _only_pairs(-F.logsigmoid(beta_pi * margin - gamma), has_pair)
    rewards = (beta_pi * norm).detach()
    return LossOutput(losses, rewards, _metrics(rewards, target_logprobs, mask))


def rpo(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    target_logprobs: torch.Tensor,
    beta_pi: float,
    mask: torch.Tensor | None = None,
    *,
    lengths: torch.Tensor | None = None,
    alpha: float = 1.0,
) -> LossOutput:
    """RPO: DPO on the best/worst pair plus a negative log-likelihood term on the chosen completion.

    Pang et al., "Iterative Reasoning Preference Optimization", NeurIPS 2024, https://arxiv.org/abs/2404.19733
    (eq. 1): ``L = −log σ(β_π Δh) − α log π_θ(y_w|x) / |y_w|`` (the NLL is length-normalised when
    ``lengths`` ``[B, K]`` are given, a plain sum otherwise). The metric ``nll`` is the mean NLL term.
    """
    mask = _full_mask(policy_logps, mask)
    h = _log_ratio(policy_logps, ref_logps, mask)
    margin, best, has_pair = _pair_margin(h, target_logprobs, mask)
    nll = -_pick(_log_ratio(policy_logps, None, mask), best)  # (B,)
    if lengths is not None:
        nll = nll / _pick(lengths.to(nll.device), best).clamp(min=1).to(nll.dtype)
    losses = _only_pairs(-F.logsigmoid(beta_pi * margin) + alpha * nll, has_pair)
    rewards = (beta_pi * h).detach()
    out = _metrics(rewards, target_logprobs, mask)
    out["nll"] = nll.detach().mean()
    return LossOutput(losses, rewards, out)


# ---------------------------------------------------------------------------------------- online RL
def rloo(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    target_logprobs: torch.Tensor,
    beta_pi: float,
    mask: torch.Tensor | None = None,
    *,
    shaped_rewards: torch.Tensor,
) -> LossOutput:
    """RLOO: REINFORCE with a leave-one-out baseline on the KL-shaped reward, for samples of the current policy.

    Ahmadian et al., "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
    Feedback in LLMs", ACL 2024, https://arxiv.org/abs/2402.14740 (Sec. 3). With ``n`` valid completions
    ``y_i ~ π_t`` and ``R_i = r_i − β (log π_t − log π_sft)(y_i)`` (``shaped_rewards``, from
    :func:`~exoalign.losses.online_targets`, β = β_π β_r)::

        A_i = R_i − (1/(n−1)) Σ_{j≠i} R_j,      L = −(1/n) Σ_i A_i log π_θ(y_i|x)

    Its gradient at θ = θ_t is an unbiased estimate of ``∇ E_{π_θ}[r] − β ∇ KL(π_θ ‖ π_sft)``: use each
    sample for one step (it is not an objective to optimise further). ``ref_logps``, ``target_logprobs`` and
    ``beta_pi`` do not enter the loss (the shaping carries β); ``target_logprobs`` picks the best/worst
    completion for the ``rewards/*`` metrics. The returned ``rewards`` are the advantages ``A`` (detached).
    """
    mask = _full_mask(policy_logps, mask)
    logp = _log_ratio(policy_logps, None, mask)  # (B, K), 0 in padding
    r = _f32(shaped_rewards.to(logp.device)).detach().masked_fill(~mask, 0.0)  # (B, K)
    n = mask.sum(-1, keepdim=True).to(r.dtype)  # (B, 1)
    # leave-one-out mean of the others; a group with one completion has no baseline and gets A = 0
    others = (r.sum(-1, keepdim=True) - r) / (n - 1).clamp(min=1)
    adv = torch.where(mask & (n >= 2), r - others, torch.zeros_like(r))  # (B, K)
    losses = -(adv * logp).sum(-1) / n.squeeze(-1).clamp(min=1)
    out = _metrics(adv, target_logprobs, mask)
    out["rloo/shaped_reward"] = (r.sum() / mask.sum().clamp(min=1)).detach()
    return LossOutput(losses, adv, out)


def ppo(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    target_logprobs: torch.Tensor,
    beta_pi: float,
    mask: torch.Tensor | None = None,
    *,
    shaped_rewards: torch.Tensor,
    sampler_logps: torch.Tensor,
    clip: float = 0.2,
) -> LossOutput:
    """PPO: the clipped surrogate on the KL-shaped reward, with RLOO's leave-one-out baseline as the advantage.

    Schulman et al., "Proximal Policy Optimization Algorithms", 2017, https://arxiv.org/abs/1707.06347 (eq. 7),
    with one action per completion: the ratio is of whole sequences. With ``n`` valid completions ``y_i ~ π_t``,
    ``R_i = r_i − β (log π_t − log π_sft)(y_i)`` (``shaped_rewards``), ``log π_t(y_i)`` (``sampler_logps``, the
    sampler's log-probs at the loss temperature) and ``c = clip``::

        A_i = R_i − (1/(n−1)) Σ_{j≠i} R_j,      ρ_i = π_θ(y_i|x) / π_t(y_i|x)
        L = −(1/n) Σ_i min(ρ_i A_i, clip(ρ_i, 1 − c, 1 + c) A_i)

    At a sample's first use (θ = θ_t, ρ = 1) ``∇ρ_i = ∇log π_θ(y_i)`` and nothing is clipped, so the gradient is
    :func:`rloo`'s exactly; on later uses of the same samples the ratio keeps the surrogate a sound estimate and
    the clip stops a completion's push once its ratio has left ``[1 − c, 1 + c]`` in the direction of its
    advantage (``A > 0, ρ > 1 + c`` or ``A < 0, ρ < 1 − c``: zero gradient). The ratio is not clipped in the
    other direction (standard PPO): a large ``ρ`` with ``A < 0`` keeps a gradient proportional to ``ρ``, and
    ``ρ = exp(log π_θ − log π_t)`` overflows once the policy is ~88 nats (float32) from the sampler on a
    sequence, far outside the range where PPO means anything.
    ``ref_logps`` and ``beta_pi`` do not enter the loss (the shaping carries β); ``target_logprobs`` picks the
    best/worst completion for the ``rewards/*`` metrics. The returned ``rewards`` are the advantages ``A``
    (detached). Metrics: ``ppo/clip_frac`` (share of valid completions whose gradient the clip zeroes),
    ``ppo/ratio`` (mean ρ) and ``ppo/shaped_reward``.
    """
    if not (isinstance(clip, (int, float)) and not isinstance(clip, bool) and 0.0 < clip < 1.0):
        raise ConfigError(f"clip must be in (0, 1), got {clip!r}", field="clip", fix="use 0.2 (PPO's default)")
    mask = _full_mask(policy_logps, mask)
    logp = _log_ratio(policy_logps, None, mask)  # (B, K), 0 in padding
    old = sampler_logps.detach().to(device=logp.device, dtype=logp.dtype).masked_fill(~mask, 0.0)  # (B, K)
    r = _f32(shaped_rewards.to(logp.device)).detach().masked_fill(~mask, 0.0)  # (B, K)
    n = mask.sum(-1, keepdim=True).to(r.dtype)  # (B, 1)
    others = (r.sum(-1, keepdim=True) - r) / (n - 1).clamp(min=1)
    adv = torch.where(mask & (n >= 2), r - others, torch.zeros_like(r))  # (B, K)
    ratio = (logp - old).exp()  # (B, K), 1 in padding
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1.0 - clip, 1.0 + clip) * adv)  # (B, K)
    terms = torch.where(mask, surrogate, torch.zeros_like(surrogate))
    losses = -terms.sum(-1) / n.squeeze(-1).clamp(min=1)
    ratio_d = ratio.detach()
    clipped = mask & (((ratio_d > 1.0 + clip) & (adv > 0)) | ((ratio_d < 1.0 - clip) & (adv < 0)))  # (B, K)
    valid = mask.sum().clamp(min=1)
    out = _metrics(adv, target_logprobs, mask)
    out["ppo/clip_frac"] = clipped.sum() / valid
    out["ppo/ratio"] = ratio_d.masked_fill(~mask, 0.0).sum() / valid
    out["ppo/shaped_reward"] = (r.sum() / valid).detach()
    return LossOutput(losses, adv, out)
