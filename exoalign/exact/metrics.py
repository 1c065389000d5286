"""Exact metrics of a policy given as a full table of log-probabilities over an enumerable outcome space.

All inputs are ``[P, N]`` tables (``P`` prompts, ``N`` outcomes); every quantity is an exact sum over the
``N`` outcomes, averaged uniformly over prompts. With the alignment objective (Ji et al., ICML 2024,
https://arxiv.org/abs/2402.00856, eq. 1)::

    J_β(π) = E_x [ E_{y~π} r(x, y) − β KL(π(·|x) ‖ π_sft(·|x)) ]
    π*_β(y|x) = π_sft(y|x) e^{r(x,y)/β} / Z_β(x),       J_β(π*) = β E_x log Z_β(x)
    J_β(π*) − J_β(π) = β E_x KL(π(·|x) ‖ π*_β(·|x))  ≥ 0

so the normalised gap ``(J(π*) − J(π)) / (J(π*) − J(π_sft))`` is ``KL(π‖π*) / KL(π_sft‖π*)``: 0 at the
optimum, 1 for the SFT policy. Best-of-N sampling from π_sft is a policy too; its table is analytic
(:func:`best_of_n_logps`).
"""

from __future__ import annotations

import torch

METRICS = ("gap", "J", "kl_to_opt", "kl_from_opt", "reward", "kl_to_sft")


def kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """``KL(p ‖ q) = Σ_y p (log p − log q)`` over the last dim, with ``0 log 0 = 0``: ``[P, N]`` → ``[P]``."""
    p = logp.exp()
    terms = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))
    return terms.sum(-1)


def optimum_logps(sft_logps: torch.Tensor, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """``log π*_β = log π_sft + r/β − log Z_β``: ``[P, N]`` → ``[P, N]``."""
    tilted = sft_logps + rewards / beta
    return tilted - torch.logsumexp(tilted, dim=-1, keepdim=True)


def objective(logps: torch.Tensor, sft_logps: torch.Tensor, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """``J_β(π)`` per prompt: ``E_π r − β KL(π ‖ π_sft)``, ``[P, N]`` → ``[P]``. Differentiable in ``logps``."""
    p = logps.exp()
    return (p * rewards).sum(-1) - beta * kl(logps, sft_logps)


def exact_metrics(
    logps: torch.Tensor, sft_logps: torch.Tensor, rewards: torch.Tensor, beta: float
) -> dict[str, float]:
    """``gap, J, kl_to_opt = KL(π‖π*), kl_from_opt = KL(π*‖π), reward, kl_to_sft``, averaged over prompts.

    Computed in float64; ``logps`` may come from any policy (trained, best-of-N, π_sft or π* itself).
    """
    logps, sft_logps, rewards = logps.double(), sft_logps.double(), rewards.double()
    opt = optimum_logps(sft_logps, rewards, beta)
    j = objective(logps, sft_logps, rewards, beta).mean()
    j_opt = objective(opt, sft_logps, rewards, beta).mean()
    j_sft = objective(sft_logps, sft_logps, rewards, beta).mean()
    return {
        "gap": ((j_opt - j) / (j_opt - j_sft)).item(),
        "J": j.item(),
        "kl_to_opt": kl(logps, opt).mean().item(),
        "kl_from_opt": kl(opt, logps).mean().item(),
        "reward": (logps.exp() * rewards).sum(-1).mean().item(),
        "kl_to_sft": kl(logps, sft_logps).mean().item(),
    }


def best_of_n_logps(sft_logps: torch.Tensor, rewards: torch.Tensor, n: int) -> torch.Tensor:
    """Exact log-probabilities of best-of-``n`` sampling from π_sft (ties broken uniformly at random).

    Draw ``n`` samples from π_sft and keep one with the highest reward. With ``F(ρ) = π_sft(r ≤ ρ)`` and the
    reward levels ``ρ`` (distinct values of ``r``), the kept reward level is ``ρ`` with probability
    ``F(ρ)^n − F(ρ⁻)^n``; given the level, the kept sample is distributed as π_sft restricted to that level
    (by exchangeability of the tied samples), so::

        π_BoN(y|x) = π_sft(y|x) · (F(r_y)^n − F(r_y⁻)^n) / π_sft(r = r_y)

    ``sft_logps``, ``rewards``: ``[P, N]``; returns ``[P, N]`` (float64).
    """
    sft_logps, rewards = sft_logps.double(), rewards.double()
    out = torch.empty_like(sft_logps)
    for x in range(sft_logps.shape[0]):
        levels, level_of = torch.unique(rewards[x], sorted=True, return_inverse=True)  # (R,), (N,)
        mass = torch.zeros(len(levels), dtype=torch.float64).index_add_(0, level_of, sft_logps[x].exp())  # (R,)
        cdf = mass.cumsum(0).clamp(max=1.0)
        below = torch.cat([cdf.new_zeros(1), cdf[:-1]])
        level_p = cdf**n - below**n  # (R,) probability that the best of n lands on each level
        out[x] = sft_logps[x] + torch.log(level_p[level_of]) - torch.log(mass[level_of])
    return out
