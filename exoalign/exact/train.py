"""Offline data and training of every method of the sequence benchmark, through the library's loss registry.

Offline data (per seed): ``pool`` completions per prompt sampled from π_sft, each scored by the known
reward; the same completions are split into ``pool/2`` pairs, each labelled once by Bradley–Terry sampling,
``P(a ≻ b) = σ((r_a − r_b)/β_r)``. Every trained method starts from π_sft and runs the same optimiser (Adam),
learning rate, number of steps and number of completions per step (``batch`` sequences: ``batch/K`` groups of
``K`` for the rw methods, ``batch/2`` labelled pairs for the pref methods):

* ``exo-rw-k{K}``, ``dpo-rw-k{K}``: groups of ``K`` completions of one prompt drawn from its pool,
  targets ``reward_targets(r, β_r)``, loss ``get_loss("exo" | "dpo")``
* ``exo-pref``, ``dpo-pref``, ``ipo``: labelled pairs, targets ``pref_targets(B, ε)`` (chosen first)
* ``rl-exact``: the reference — gradient ascent on the exact ``J_β`` by enumeration (what RL with infinitely
  many samples would do); it needs no data.
* ``online-exo-k{K}``, ``online-dpo-k{K}``, ``rloo-k{K}``, ``ppo-k{K}`` (suffix ``-r{R}`` for reuse R): sampled from the
  current policy each round, see ``online.py``; no offline data.

The losses get ``β_π = β / β_r``, so that every method's optimum is π*_β with the same β (DESIGN.md).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..losses import ess, get_loss, masked_log_softmax, pref_targets, reward_targets
from .metrics import exact_metrics, kl, objective, optimum_logps
from .online import train_online
from .problem import SeqPolicy, enumerate_logps, sequence_logps


@dataclass(frozen=True)
class Method:
    """A trained method: the registry loss, its target kind and the group size it trains on."""

    name: str
    loss: str
    targets: str  # "rw" | "pref" | "exact" | "online"
    k: int
    reuse: int = 1
    """Online methods: optimiser steps per sampled round."""


def online_methods(ks: tuple[int, ...], reuse: tuple[int, ...]) -> list[Method]:
    """``online-exo-k{K}``, ``online-dpo-k{K}``, ``rloo-k{K}``, ``ppo-k{K}`` for every K, and with suffix ``-r{R}``
    for every reuse R > 1 in ``reuse``."""
    out = []
    for r in reuse:
        suffix = "" if r == 1 else f"-r{r}"
        for k in ks:
            out += [Method(f"online-exo-k{k}{suffix}", "exo", "online", k, r),
                    Method(f"online-dpo-k{k}{suffix}", "dpo", "online", k, r),
                    Method(f"rloo-k{k}{suffix}", "rloo", "online", k, r),
                    Method(f"ppo-k{k}{suffix}", "ppo", "online", k, r)]
    return out


def trained_methods(ks: tuple[int, ...], reuse: tuple[int, ...] = ()) -> list[Method]:
    """``exo-pref, dpo-pref, ipo, exo-rw-k{K}, dpo-rw-k{K}`` for every ``K`` in ``ks``, the online methods for
    every reuse in ``reuse`` (none by default), then the two exact references ``rl-exact`` (reverse KL to π*,
    i.e. −J) and ``fkl-exact`` (forward KL ``KL(π*‖π_θ)``)."""
    out = [Method("exo-pref", "exo", "pref", 2), Method("dpo-pref", "dpo", "pref", 2), Method("ipo", "ipo", "pref", 2)]
    for k in ks:
        out += [Method(f"exo-rw-k{k}", "exo", "rw", k), Method(f"dpo-rw-k{k}", "dpo", "rw", k)]
    out += online_methods(ks, reuse)
    return out + [Method("rl-exact", "rl", "exact", 0), Method("fkl-exact", "fkl", "exact", 0)]


@dataclass
class OfflineData:
    """One seed's offline dataset. ``P`` prompts, ``M`` completions per prompt."""

    seqs: torch.Tensor  # (P, M, L) long, sampled from π_sft
    rewards: torch.Tensor  # (P, M) float32
    ref_logps: torch.Tensor  # (P, M) float32, log π_sft — the cached reference log-probs
    pairs: torch.Tensor  # (P, M/2, 2) long indices into the pool, chosen first


def sample_offline(
    sft_logps: torch.Tensor, rewards: torch.Tensor, all_seqs: torch.Tensor, pool: int, beta_r: float, gen: torch.Generator
) -> OfflineData:
    """Sample ``pool`` completions per prompt from π_sft (given as its exact table ``[P, N]``) and label them.

    Sampling from the enumerated table is exactly ancestral sampling from the GRU. Pairs are consecutive
    pool entries ``(2i, 2i+1)``; the first is chosen with probability ``σ((r_a − r_b)/β_r)`` (Bradley–Terry).
    """
    p = sft_logps.shape[0]
    idx = torch.multinomial(sft_logps.double().exp(), pool, replacement=True, generator=gen)  # (P, M)
    r = rewards.gather(1, idx)  # (P, M)
    a, b = torch.arange(0, pool, 2), torch.arange(1, pool, 2)
    first_wins = torch.rand(p, pool // 2, generator=gen, dtype=torch.float64) < torch.sigmoid((r[:, a] - r[:, b]) / beta_r)
    chosen = torch.where(first_wins, a, b)  # (P, M/2)
    rejected = torch.where(first_wins, b, a)
    return OfflineData(
        seqs=all_seqs[idx],
        rewards=r.float(),
        ref_logps=sft_logps.gather(1, idx).float(),
        pairs=torch.stack([chosen, rejected], dim=-1),
    )


def _batch(data: OfflineData, method: Method, batch: int, gen: torch.Generator):
    """Draw one step's groups: prompt ids ``[G]``, pool indices ``[G, K]`` (``G = batch // K``)."""
    p, m = data.rewards.shape
    if method.targets == "pref":
        g = batch // 2
        x = torch.randint(p, (g,), generator=gen)
        return x, data.pairs[x, torch.randint(m // 2, (g,), generator=gen)]  # (G, 2)
    g = batch // method.k
    x = torch.randint(p, (g,), generator=gen)
    # K completions of the same prompt, drawn uniformly (with replacement) from its pool: an unbiased
    # sample of K draws from the empirical π_sft of the offline data
    return x, torch.randint(m, (g, method.k), generator=gen)


def loss_on_batch(
    policy: SeqPolicy, data: OfflineData, method: Method, x: torch.Tensor, idx: torch.Tensor,
    beta_pi: float, beta_r: float, eps: float,
) -> tuple[torch.Tensor, float, float]:
    """The mean library loss on groups ``idx [G, K]`` of prompts ``x [G]`` — the user-facing code path — and
    the mean ESS fraction ``(1/Σp²)/K`` of the loss's p = softmax(β_π h) and of its target q."""
    g, k = idx.shape
    seqs = data.seqs[x.unsqueeze(1), idx]  # (G, K, L)
    policy_logps = sequence_logps(policy, x.repeat_interleave(k), seqs.reshape(g * k, -1)).view(g, k)
    ref_logps = data.ref_logps[x.unsqueeze(1), idx]  # (G, K)
    if method.targets == "rw":
        targets = reward_targets(data.rewards[x.unsqueeze(1), idx], beta_r)
    else:
        targets = pref_targets(g, eps)
    out = get_loss(method.loss)(policy_logps, ref_logps, targets, beta_pi)
    log_p = masked_log_softmax(beta_pi * (policy_logps.detach() - ref_logps), None)  # (G, K)
    return out.losses.mean(), ess(log_p).mean().item(), ess(targets).mean().item()


def train_method(
    method: Method,
    sft_policy: SeqPolicy,
    sft_logps: torch.Tensor,
    rewards: torch.Tensor,
    data: OfflineData | None,
    *,
    beta: float,
    beta_r: float,
    eps: float,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    eval_every: int,
    tick: Callable[[], None] = lambda: None,
) -> tuple[SeqPolicy, list[tuple[int, float]], dict[str, float]]:
    """Train a copy of π_sft with ``method``; return it, the exact-gap curve ``[(step, gap), …]`` and the
    training statistics (``ess``, ``ess_q``: mean ESS fractions of p and q; empty for the exact references).

    ``sft_logps``/``rewards``: ``[P, N]`` exact tables (for rl-exact, the online methods and the curve).
    ``tick`` is called once per step (progress bar).
    """
    policy = copy.deepcopy(sft_policy).float().train()
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    # cosine decay to 0: the same schedule for every method, so that each ends near a fixed point of its
    # own loss rather than bouncing in the minibatch noise at a constant step size
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.arange(sft_logps.shape[0])
    sft32, r32 = sft_logps.float(), rewards.float()
    opt32 = optimum_logps(sft_logps, rewards, beta).float()
    curve = [(0, 1.0)]

    def after(step: int) -> None:
        tick()
        if step % eval_every == 0 or step == steps:
            curve.append((step, evaluate(policy, sft_logps, rewards, beta)["gap"]))

    if method.targets == "online":
        stats = train_online(policy, method.loss, method.k, method.reuse, sft32, r32, beta_pi=beta / beta_r,
                             beta_r=beta_r, steps=steps, batch=batch, opt=opt, sched=sched, gen=gen, on_step=after)
        return policy, curve, stats
    ess_p = ess_q = 0.0
    for step in range(1, steps + 1):
        if method.targets == "exact":
            logps = enumerate_logps(policy, prompts)  # (P, N)
            if method.loss == "rl":
                loss = -objective(logps, sft32, r32, beta).mean()
            else:
                loss = kl(opt32, logps).mean()
        else:
            assert data is not None
            x, idx = _batch(data, method, batch, gen)
            loss, e_p, e_q = loss_on_batch(policy, data, method, x, idx, beta / beta_r, beta_r, eps)
            ess_p, ess_q = ess_p + e_p, ess_q + e_q
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        after(step)
    stats = {} if method.targets == "exact" else {"ess": ess_p / steps, "ess_q": ess_q / steps}
    return policy, curve, stats


@torch.no_grad()
def policy_table(policy: SeqPolicy, prompts: int) -> torch.Tensor:
    """The policy's exact ``log π(y|x)`` table ``[P, N]``, computed in float64."""
    return enumerate_logps(copy.deepcopy(policy).double(), torch.arange(prompts))


def evaluate(policy: SeqPolicy, sft_logps: torch.Tensor, rewards: torch.Tensor, beta: float) -> dict[str, float]:
    """Exact metrics of ``policy`` (see :func:`exact_metrics`)."""
    return exact_metrics(policy_table(policy, sft_logps.shape[0]), sft_logps, rewards, beta)
