"""Win rate against a baseline and confidence intervals for means.

Win rate: policy sample ``j`` of prompt ``i`` meets the baseline's sample ``j`` of the same prompt and the judge
(reward model or oracle) decides: ``w_ij = 1`` if ``r_policy > r_base``, ``½`` on a tie, ``0`` otherwise. The win
rate is ``mean_ij w_ij``; its confidence interval is a percentile bootstrap that resamples prompts with
replacement (prompts are the independent units; samples of one prompt are correlated).

Mean reward: mean over prompts of each prompt's mean reward, with the normal-approximation interval
``mean ± z_{(1+c)/2} · sd / √n`` (n prompts; fine for the hundreds of prompts an evaluation uses).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np


@dataclass
class Interval:
    """A point estimate with a two-sided confidence interval."""

    mean: float
    ci_low: float
    ci_high: float

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "ci_low": self.ci_low, "ci_high": self.ci_high}


def mean_ci(values: np.ndarray, confidence: float = 0.95) -> Interval:
    """Mean of per-prompt means of ``values`` ``[n_prompts, n_samples]`` with a normal-approximation CI."""
    per_prompt = np.asarray(values, dtype=np.float64).reshape(len(values), -1).mean(axis=1)
    mean = float(per_prompt.mean())
    if per_prompt.size < 2:
        return Interval(mean, float("nan"), float("nan"))
    half = NormalDist().inv_cdf((1 + confidence) / 2) * float(per_prompt.std(ddof=1)) / math.sqrt(per_prompt.size)
    return Interval(mean, mean - half, mean + half)


def outcomes(r_policy: np.ndarray, r_base: np.ndarray) -> np.ndarray:
    """``w = 1`` (win), ``0.5`` (tie) or ``0`` (loss) per paired sample; same shape as the inputs."""
    a, b = np.asarray(r_policy, dtype=np.float64), np.asarray(r_base, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"policy rewards {a.shape} and baseline rewards {b.shape} must pair up")
    return (a > b) + 0.5 * (a == b)


@dataclass
class WinRate(Interval):
    wins: int = 0
    ties: int = 0
    losses: int = 0

    def to_dict(self) -> dict[str, float]:
        return {**super().to_dict(), "wins": self.wins, "ties": self.ties, "losses": self.losses}


def win_rate(
    r_policy: np.ndarray, r_base: np.ndarray, *, confidence: float = 0.95, n_boot: int = 1000, seed: int = 0
) -> WinRate:
    """Win rate of the policy over the baseline with a prompt-level percentile bootstrap CI.

    ``r_policy`` and ``r_base`` are ``[n_prompts, n_samples]`` rewards paired by position.
    """
    w = outcomes(r_policy, r_base)
    w = w.reshape(w.shape[0], -1)  # (n_prompts, n_samples)
    per_prompt = w.mean(axis=1)  # (n_prompts,)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, per_prompt.size, size=(n_boot, per_prompt.size))  # (n_boot, n_prompts)
    boot = per_prompt[picks].mean(axis=1)  # (n_boot,)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(boot, [alpha, 1 - alpha])
    return WinRate(
        float(per_prompt.mean()), float(low), float(high),
        wins=int((w == 1).sum()), ties=int((w == 0.5).sum()), losses=int((w == 0).sum()),
    )
