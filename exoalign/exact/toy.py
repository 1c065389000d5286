"""The one-dimensional illustration: a unimodal policy family fitted to a bimodal optimum by EXO and by DPO.

Outcomes are ``n`` bins ``x_i = (i + ½)/n`` on [0, 1]. π_sft is a discretised Gaussian; the reward has two
bumps of unequal height, so ``π*_β ∝ π_sft e^{r/β}`` has two unequal modes. The policy family is the
discretised Gaussian ``π_θ(i) ∝ exp(−(x_i − μ)² / 2σ²)`` (θ = (μ, log σ)): it contains π_sft but no
bimodal distribution, so it cannot represent π*. Starting from π_sft, EXO and DPO are trained by the library
losses on the same offline data — ``pool`` outcomes sampled from π_sft with their rewards, grouped ``K`` at a
time — with the same optimiser and steps. EXO (reverse KL, mode-seeking) should settle on the dominant
mode; DPO (forward KL, mean-seeking) should spread over both (Ji et al., ICML 2024, Fig. 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..losses import get_loss, reward_targets
from .metrics import exact_metrics, optimum_logps


@dataclass(frozen=True)
class ToySpec:
    """The illustration's settings (the CLI fills them from the benchmark config)."""

    bins: int = 100
    beta: float = 0.5
    """KL coefficient β of the illustration (fixed, so the picture does not depend on ``--beta``)."""
    beta_pi: float = 1.0
    """β_π of the losses; β_r = β/β_π."""
    pool: int = 1000
    k: int = 8
    groups: int = 32
    """Groups of ``k`` outcomes per step."""
    steps: int = 600
    lr: float = 0.02
    seed: int = 0


class GaussianPolicy(nn.Module):
    """Discretised Gaussian over ``n`` bins: ``log π_θ(i) = −(x_i − μ)²/2σ² − log Σ_j exp(…)``."""

    def __init__(self, bins: int, mu: float, sigma: float) -> None:
        super().__init__()
        self.register_buffer("x", (torch.arange(bins, dtype=torch.float64) + 0.5) / bins)
        self.mu = nn.Parameter(torch.tensor(mu, dtype=torch.float64))
        self.log_sigma = nn.Parameter(torch.tensor(math.log(sigma), dtype=torch.float64))

    def forward(self) -> torch.Tensor:
        """``[1, n]`` log-probabilities (a one-prompt table, the layout :func:`exact_metrics` takes)."""
        z = -0.5 * ((self.x - self.mu) / self.log_sigma.exp()) ** 2
        return torch.log_softmax(z, dim=-1).unsqueeze(0)


def toy_problem(spec: ToySpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sft_logps [1, n], rewards [1, n])``: π_sft = N(0.5, 0.2²) discretised; two reward bumps.

    ``r(x) = 4 exp(−(x − 0.25)²/2·0.1²) + 3.2 exp(−(x − 0.75)²/2·0.1²)`` (Bradley–Terry units): the left bump
    is higher, so the left mode of π* is the dominant one.
    """
    sft = GaussianPolicy(spec.bins, 0.5, 0.2)().detach()
    x = (torch.arange(spec.bins, dtype=torch.float64) + 0.5) / spec.bins
    bump = lambda c: torch.exp(-0.5 * ((x - c) / 0.1) ** 2)
    rewards = (4.0 * bump(0.25) + 3.2 * bump(0.75)).unsqueeze(0)
    return sft, rewards


def train_toy(spec: ToySpec, loss_name: str) -> GaussianPolicy:
    """Fit the Gaussian family from π_sft with ``get_loss(loss_name)`` on rw targets of the offline pool."""
    sft_logps, rewards = toy_problem(spec)
    gen = torch.Generator().manual_seed(spec.seed)
    pool = torch.multinomial(sft_logps[0].exp(), spec.pool, replacement=True, generator=gen)  # (M,) bin ids
    policy = GaussianPolicy(spec.bins, 0.5, 0.2)
    opt = torch.optim.Adam(policy.parameters(), lr=spec.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=spec.steps)
    loss_fn = get_loss(loss_name)
    for _ in range(spec.steps):
        ys = pool[torch.randint(spec.pool, (spec.groups, spec.k), generator=gen)]  # (G, K) bin ids
        logps = policy()[0][ys]  # (G, K)
        targets = reward_targets(rewards[0][ys], spec.beta / spec.beta_pi)
        out = loss_fn(logps, sft_logps[0][ys], targets, spec.beta_pi)
        opt.zero_grad()
        out.losses.mean().backward()
        opt.step()
        sched.step()
    return policy


def project(spec: ToySpec, direction: str, steps: int = 1500) -> GaussianPolicy:
    """The best Gaussian by exact gradient descent from π_sft on ``KL(π_θ‖π*)`` (``"reverse"``, what RL
    reaches) or ``KL(π*‖π_θ)`` (``"forward"``, what DPO-rw reaches with infinite data and K → ∞)."""
    from .metrics import kl

    sft_logps, rewards = toy_problem(spec)
    opt = optimum_logps(sft_logps, rewards, spec.beta)
    policy = GaussianPolicy(spec.bins, 0.5, 0.2)
    adam = torch.optim.Adam(policy.parameters(), lr=0.01)
    for _ in range(steps):
        loss = kl(policy(), opt).sum() if direction == "reverse" else kl(opt, policy()).sum()
        adam.zero_grad()
        loss.backward()
        adam.step()
    return policy


def run_toy(spec: ToySpec) -> dict:
    """Train EXO and DPO; return the four distributions (lists) and the exact metrics of each fit and of the
    two exact projections (``rkl-exact``, ``fkl-exact``) onto the Gaussian family."""
    sft_logps, rewards = toy_problem(spec)
    opt = optimum_logps(sft_logps, rewards, spec.beta)
    out: dict = {"beta": spec.beta, "beta_pi": spec.beta_pi, "k": spec.k, "pool": spec.pool, "steps": spec.steps,
                 "sft": sft_logps[0].exp().tolist(), "opt": opt[0].exp().tolist(), "metrics": {}}
    fits = {"exo": lambda: train_toy(spec, "exo"), "dpo": lambda: train_toy(spec, "dpo"),
            "rkl-exact": lambda: project(spec, "reverse"), "fkl-exact": lambda: project(spec, "forward")}
    for name, fit in fits.items():
        policy = fit()
        with torch.no_grad():
            logps = policy()
        if "exact" not in name:
            out[name] = logps[0].exp().tolist()
        out["metrics"][name] = exact_metrics(logps, sft_logps, rewards, spec.beta) | {
            "mu": policy.mu.item(),
            "sigma": policy.log_sigma.exp().item(),
        }
    return out


def plot_toy(result: dict, path: str, beta: float) -> None:
    """One PNG with π_sft, π*, π_EXO and π_DPO over the bins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(result["sft"])
    xs = range(n)
    m = result["metrics"]
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    ax.plot(xs, result["sft"], color="0.55", lw=1.5, ls="--", label="π_sft")
    ax.fill_between(xs, result["opt"], color="tab:green", alpha=0.25, label=f"π* (β={beta:g})")
    ax.plot(xs, result["exo"], color="tab:red", lw=2, label=f"π_EXO  (gap {m['exo']['gap']:.2f})")
    ax.plot(xs, result["dpo"], color="tab:blue", lw=2, label=f"π_DPO  (gap {m['dpo']['gap']:.2f})")
    ax.set_xlabel("outcome (bin)")
    ax.set_ylabel("probability")
    ax.set_title(f"Unimodal (Gaussian) policy vs bimodal optimum π*: rw targets, K={result.get('k', '?')}, "
                 f"{result.get('pool', '?')} samples of π_sft", fontsize=10)
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
