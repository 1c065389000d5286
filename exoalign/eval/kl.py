"""Monte-Carlo estimators of the sequence-level ``KL(π_θ ‖ π_sft)`` from the policy's own samples.

For a prompt ``x`` and completions ``y_1..y_n ~ π_θ(·|x)`` with per-sequence log-ratio
``ℓ_i = log π_θ(y_i|x) − log π_sft(y_i|x)`` (log-probs summed over completion tokens, EOS included when the
model stopped), two unbiased estimators of ``KL(π_θ(·|x) ‖ π_sft(·|x)) = E_{y~π_θ}[ℓ(y)]``:

* ``k1`` (the EXO authors' estimator, ``eval_kl.py`` in their code): ``mean_i ℓ_i``. Unbiased, but single
  terms are negative whenever ``π_sft(y) > π_θ(y)``, so its variance is high when the policies are close.
* ``k3`` (Schulman, "Approximating KL divergence", 2020): with ``ρ_i = π_sft(y_i|x) / π_θ(y_i|x) = e^{−ℓ_i}``,
  ``mean_i (ρ_i − 1) − log ρ_i``. Unbiased because ``E_{π_θ}[ρ] = 1``, and every term is ≥ 0
  (``t − 1 ≥ log t``), so it has lower variance near ``π_θ = π_sft``, where both are exactly 0.

Both are computed at a temperature ``T``: the log-probs come from ``softmax(logits / T)``, the distribution
the samples were drawn from (the authors divide logits by the sampling temperature 0.8 too). With top-k /
top-p the samples come from a truncated distribution, so the estimates are then approximate.

Prompts are the unit of the standard error: each prompt's estimates are averaged first, and the reported
value is the mean over prompts (equal to the plain mean when every prompt has the same number of samples).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# exp(700) is finite in float64; a log-ratio below −700 would make ρ overflow to inf.
_MAX_LOG_RHO = 700.0


def k1_terms(logp_policy: np.ndarray, logp_ref: np.ndarray) -> np.ndarray:
    """Per-sample ``ℓ = log π_θ(y) − log π_sft(y)``; any shape, e.g. ``[n_prompts, n_samples]``."""
    return np.asarray(logp_policy, dtype=np.float64) - np.asarray(logp_ref, dtype=np.float64)


def k3_terms(logp_policy: np.ndarray, logp_ref: np.ndarray) -> np.ndarray:
    """Per-sample ``(ρ − 1) − log ρ`` with ``log ρ = log π_sft(y) − log π_θ(y)``; every term is ≥ 0."""
    log_rho = np.minimum(-k1_terms(logp_policy, logp_ref), _MAX_LOG_RHO)
    return np.expm1(log_rho) - log_rho  # expm1: exact for small log ρ, where ρ − 1 would cancel


@dataclass
class Estimate:
    """A mean over prompts with its standard error."""

    mean: float
    se: float

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "se": self.se}


def _over_prompts(terms: np.ndarray) -> Estimate:
    """Mean and standard error of per-prompt means of ``terms`` ``[n_prompts, n_samples]``."""
    per_prompt = terms.reshape(terms.shape[0], -1).mean(axis=1)  # (n_prompts,)
    n = per_prompt.size
    se = float(per_prompt.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return Estimate(float(per_prompt.mean()), se)


def kl_k1(logp_policy: np.ndarray, logp_ref: np.ndarray) -> Estimate:
    """The authors' estimator ``mean log π_θ(y) − log π_sft(y)`` over samples of ``π_θ`` ``[n_prompts, n]``."""
    return _over_prompts(k1_terms(logp_policy, logp_ref))


def kl_k3(logp_policy: np.ndarray, logp_ref: np.ndarray) -> Estimate:
    """The k3 estimator ``mean (ρ − 1) − log ρ``, ``ρ = π_sft(y)/π_θ(y)``, over samples of ``π_θ``."""
    return _over_prompts(k3_terms(logp_policy, logp_ref))
