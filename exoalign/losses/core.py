"""Alignment losses as pure functions of grouped sequence log-probabilities.

Every loss has the signature ``loss(policy_logps, ref_logps, target_logprobs, beta_pi, mask=None, **params)``:

* ``policy_logps``, ``ref_logps``: ``[B, K]`` summed completion log-probs under π_θ and π_sft
* ``target_logprobs``: ``[B, K]`` log-target distribution over the K completions (see ``targets.py``); for
  preference pairs column 0 is the chosen completion
* ``mask``: ``[B, K]`` bool, True where a completion exists (groups may have different K)

and returns a :class:`LossOutput` ``(losses [B], rewards [B, K], metrics)``: unreduced per-group losses (the
caller reduces), the detached implicit rewards ``β_π (log π_θ − log π_sft)`` and a dict of scalar metrics.

Pairwise losses (ipo, cdpo, simpo, rpo, hinge) use the best and the worst valid completion of each group by
target probability as chosen and rejected; on preference pairs these are columns 0 and 1.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .targets import NEG, check_eps, masked_log_softmax


class LossOutput(NamedTuple):
    losses: torch.Tensor  # (B,)
    rewards: torch.Tensor  # (B, K), detached
    metrics: dict[str, torch.Tensor]


def _full_mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return torch.ones_like(x, dtype=torch.bool) if mask is None else mask.to(torch.bool)


def _best_worst(target_logprobs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``[B]`` of the completion with the highest and the lowest target probability among valid ones."""
    t = target_logprobs.detach()
    best = t.masked_fill(~mask, float("-inf")).argmax(dim=-1)
    worst = t.masked_fill(~mask, float("inf")).argmin(dim=-1)
    return best, worst


def _pick(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(-1, idx.unsqueeze(-1)).squeeze(-1)  # (B, K) → (B,)


def _metrics(rewards: torch.Tensor, target_logprobs: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """``rewards/{chosen,rejected,margins,accuracies}`` from the best and worst completion by target."""
    best, worst = _best_worst(target_logprobs, mask)
    chosen, rejected = _pick(rewards, best), _pick(rewards, worst)
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "rewards/accuracies": (chosen > rejected).float().mean(),
    }


def _implicit(policy_logps, ref_logps, beta_pi, mask):
    """``β_π h`` with ``h = log π_θ − log π_sft``; padding slots set to 0 so they stay finite."""
    h = policy_logps if ref_logps is None else policy_logps - ref_logps
    return (beta_pi * h).masked_fill(~mask, 0.0)  # (B, K)


def exo(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    target_logprobs: torch.Tensor,
    beta_pi: float,
    mask: torch.Tensor | None = None,
) -> LossOutput:
    """EXO: reverse KL from the policy's to the target distribution over the K completions.

    Ji et al., "Towards Efficient Exact Optimization of Language Model Alignment", ICML 2024,
    https://arxiv.org/abs/2402.00856 (eq. 10–12). With ``h_i = log π_θ(y_i|x) − log π_sft(y_i|x)``::

        p = softmax(β_π h)          (policy's distribution over the K samples)
        L = KL(p ‖ q) = Σ_i p_i (log p_i − log q_i)

    With q = softmax(r / β_r) and y_i ~ π_sft, the gradient of L tends (K → ∞) to the gradient of
    ``KL(π_θ^{β_π} ‖ π*_{β_r})``, i.e. of the RL objective with KL coefficient β = β_π β_r: EXO is
    mode-seeking like RL. With preference targets q = [1 − ε, ε] it is TRL's ``exo_pair``.
    """
    mask = _full_mask(policy_logps, mask)
    logits = _implicit(policy_logps, ref_logps, beta_pi, mask)  # (B, K)
    log_p = masked_log_softmax(logits, mask)  # (B, K)
    log_q = target_logprobs.masked_fill(~mask, NEG)
    terms = torch.where(mask, log_p.exp() * (log_p - log_q), torch.zeros_like(log_p))  # (B, K)
    losses = terms.sum(-1)
    rewards = logits.detach()
    return LossOutput(losses, rewards, _metrics(rewards, target_logprobs, mask))


def dpo(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    target_logprobs: torch.Tensor,
    beta_pi: float,
    mask: torch.Tensor | None = None,
) -> LossOutput:
    """DPO: forward KL (cross-entropy) from the target to the policy's distribution over the K completions.

    Rafailov et al., "Direct Preference Optimization", NeurIPS 2023, https://arxiv.org/abs/2305.18290; the
    listwise form with reward targets is the Plackett–Luce-free "DPO-rw" of Ji et al. 2024 (eq. 13)::

        L = −Σ_i q_i log p_i,    p = softmax(β_π h)

    which differs from ``KL(q ‖ p)`` by the target's entropy (a constant). With preference targets and ε → 0
    it is ``−log σ(β_π (h_w − h_l))``; with ε > 0 it is label-smoothed (conservative) DPO. Mean-seeking.
    """
    mask = _full_mask(policy_logps, mask)
    logits = _implicit(policy_logps, ref_logps, beta_pi, mask)
    log_p = masked_log_softmax(logits, mask)
    q = target_logprobs.masked_fill(~mask, NEG).exp()
    terms = torch.where(mask, -q * log_p, torch.zeros_like(log_p))
    losses = terms.sum(-1)
    rewards = logits.detach()
    return LossOutput(losses, rewards, _metrics(rewards, target_logprobs, mask))


def _pair_margin(policy_logps, ref_logps, target_logprobs, mask):
    """``(h_w − h_l)`` for the best/worst completion by target, plus the indices. Shapes (B,)."""
    mask = _full_mask(policy_logps, mask)
    h = policy_logps if ref_logps is None else policy_logps - ref_logps
    h = h.masked_fill(~mask, 0.0)
    best, worst = _best_worst(target_logprobs, mask)
    return _pick(h, best) - _pick(h, worst), mask, best, worst


def ipo(policy_logps, ref_logps, target_logprobs, beta_pi, mask=None) -> LossOutput:
    """IPO: squared loss regressing the log-ratio margin to ``1 / (2τ)`` with τ = β_π.

    Azar et al., "A General Theoretical Paradigm to Understand Learning from Human Preferences", AISTATS 2024,
    https://arxiv.org/abs/2310.12036 (eq. 17): ``L = (h_w − h_l − 1/(2β_π))²``.
    """
    margin, mask, _, _ = _pair_margin(policy_logps, ref_logps, target_logprobs, mask)
    losses = (margin - 1.0 / (2.0 * beta_pi)) ** 2
    rewards = _implicit(policy_logps, ref_logps, beta_pi, mask).detach()
    return LossOutput(losses, rewards, _metrics(rewards, target_logprobs, mask))


def cdpo(policy_logps, ref_logps, target_logprobs, beta_pi, mask=None, *, label_smoothing: float = 0.1) -> LossOutput:
    """Conservative (label-smoothed) DPO on the best/worst pair.

    Mitchell, "A note on DPO with noisy preferences & relationship to IPO", 2023,
    https://ericmitchell.ai/cdpo.pdf: ``L = −(1 − ε) log σ(β_π Δh) − ε log σ(−β_π Δh)``.
    """
    eps = check_eps(label_smoothing)
    margin, mask, _, _ = _pair_margin(policy_logps, ref_logps, target_logprobs, mask)
    z = beta_pi * margin
    losses = -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    rewards = _implicit(policy_logps, ref_logps, beta_pi, mask).detach()
    return LossOutput(losses, rewards, _metrics(rewards, target_logprobs, mask))


def hinge(policy_logps, ref_logps, target_logprobs, beta_pi, mask=None) -> LossOutput:
    """Hinge loss on the scaled log-ratio margin (SLiC-style calibration).

    Zhao et al., "SLiC-HF: Sequence Likelihood Calibration with Human Feedback", 2023,
    https://arxiv.org/abs/2305.10425: ``L = max(0, 1 − β_π Δh)``.
    """
    margin, mask, _, _ = _pair_margin(policy_logps, ref_logps, target_logprobs, mask)
    losses = torch.relu(1.0 - beta_pi * margin)
    rewards = _implicit(policy_logps, ref_logps, beta_pi, mask).detach()
    return LossOutput(losses, rewards, _metrics(rewards, target_logprobs, mask))


def simpo(
    policy_logps, ref_logps, target_logprobs, beta_pi, mask=None, *, lengths: torch.Tensor, gamma: float = 0.5
) -> LossOutput:
    """SimPO: reference-free, length-normalised margin loss with a target margin γ.

    Meng et al., "SimPO: Simple Preference Optimization with a Reference-Free Reward", NeurIPS 2024,
    https://arxiv.org/abs/2405.14734 (eq. 6)::

        L = −log σ(β (log π(y_w)/|y_w| − log π(y_l)/|y_l|) − γ)

    ``lengths``: ``[B, K]`` completion token counts. ``ref_logps`` is ignored (may be None).
    """
    mask = _full_mask(policy_logps, mask)
    norm = policy_logps / lengths.clamp(min=1).to(policy_logps.dtype)  # (B, K)
    margin, mask, _, _ = _pair_margin(norm, None, target_logprobs, mask)
    losses = -F.logsigmoid(beta_pi * margin - gamma)
    rewards = (beta_pi * norm).masked_fill(~mask, 0.0).detach()
    return LossOutput(losses, rewards, _metrics(rewards, target_logprobs, mask))


def rpo(
    policy_logps,
    ref_logps,
    target_logprobs,
    beta_pi,
    mask=None,
    *,
    lengths: torch.Tensor | None = None,
    alpha: float = 1.0,
) -> LossOutput:
    """RPO: DPO on the best/worst pair plus a negative log-likelihood term on the chosen completion.

    Pang et al., "Iterative Reasoning Preference Optimization", NeurIPS 2024, https://arxiv.org/abs/2404.19733
    (eq. 1): ``L = −log σ(β_π Δh) − α log π_θ(y_w|x) / |y_w|`` (the NLL is length-normalised when
    ``lengths`` ``[B, K]`` are given).
    """
    margin, mask, best, _ = _pair_margin(policy_logps, ref_logps, target_logprobs, mask)
    nll = -_pick(policy_logps, best)
    if lengths is not None:
        nll = nll / _pick(lengths, best).clamp(min=1).to(nll.dtype)
    losses = -F.logsigmoid(beta_pi * margin) + alpha * nll
    rewards = _implicit(policy_logps, ref_logps, beta_pi, mask).detach()
    out = _metrics(rewards, target_logprobs, mask)
    out["nll"] = nll.detach().mean()
    return LossOutput(losses, rewards, out)
