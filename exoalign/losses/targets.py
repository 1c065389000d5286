"""Target distributions over the K completions of a prompt, as log-probabilities.

* preference labels (chosen, rejected): ``q = [1 − ε, ε]`` — :func:`pref_targets`
* reward labels ``r_1..r_K``: ``q = softmax(r / β_r)`` over the valid completions — :func:`reward_targets`

Invalid (padding) slots get a very negative finite log-probability, :data:`NEG`, so that every quantity
downstream stays finite; losses additionally zero their contribution with the mask.
"""

from __future__ import annotations

import math

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


def reward_targets(rewards: torch.Tensor, beta_r: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Log-targets ``log_softmax(r / β_r)`` over the valid completions of each group.

    ``rewards``: ``[B, K]``; ``mask``: ``[B, K]`` bool (True = valid completion). Returns ``[B, K]``; invalid
    slots hold :data:`NEG`. Rewards in masked slots are ignored (they may be NaN padding).
    """
    if not (isinstance(beta_r, (int, float)) and math.isfinite(beta_r) and beta_r > 0):
        raise ConfigError(
            f"beta_r must be > 0, got {beta_r!r}",
            field="beta_r",
            fix="use a positive temperature such as 0.1",
        )
    # Integer or half-precision rewards: r / β_r with a small β_r needs float32 resolution.
    rewards = rewards if rewards.dtype in (torch.float32, torch.float64) else rewards.float()
    if mask is not None:
        rewards = rewards.masked_fill(~mask.to(device=rewards.device, dtype=torch.bool), 0.0)
    return masked_log_softmax(rewards / beta_r, mask)
