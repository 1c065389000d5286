"""Online methods of the sequence benchmark: sample from the current policy, correct for it, train.

Every ``reuse`` steps a fresh round is drawn: ``batch/K`` prompts uniformly, ``K`` completions of each by
ancestral sampling from the current GRU π_t, scored by the known reward. The round's targets come from
:func:`~exoalign.losses.online_targets` with the sampler's log-probs ``log π_t`` (the same teacher-forced
log-probs the loss sees at the round's first step) and the cached ``log π_sft``; the round is then used for
``reuse`` steps, each on the whole round (so every method sees ``batch`` completions per step, and
``batch/reuse`` fresh ones):

* ``online-exo-k{K}``, ``online-dpo-k{K}``: ``get_loss("exo" | "dpo")`` with the corrected reference
  ``log π_sft + (log π_t − log π_sft)/β_π`` and ``q = softmax(r/β_r − (log π_t − log π_sft))``
* ``rloo-k{K}``: ``get_loss("rloo")`` on the KL-shaped reward ``r − β (log π_t − log π_sft)``
* ``ppo-k{K}``: ``get_loss("ppo")`` on the same reward and advantage, with the sequence ratio ``π_θ/π_t``
  (``log π_t``: the round's sampler log-probs) clipped to ``[1 − c, 1 + c]``, ``c = 0.2``

Suffix ``-r{R}``: reuse R > 1. RLOO with reuse is the naive one (the same ``−A log π_θ`` for R steps, no
importance ratio or clipping), included to show what reuse does to a loss that is not an objective; PPO is the
RL baseline built for reuse (at R = 1 its gradient is RLOO's).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..losses import ess, get_loss, loss_info, masked_log_softmax, online_targets
from .problem import SeqPolicy, seq_index, sequence_logps


@torch.no_grad()
def sample_sequences(policy: SeqPolicy, prompts: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """``k`` ancestral samples of ``π(y|x)`` for each prompt: ``prompts [G]`` → ``[G, k, L]`` long."""
    x = prompts.repeat_interleave(k)  # (G·k,)
    h, e = policy.start(x)
    tok = policy.bos(len(x), x.device)
    out = []
    for _ in range(policy.length):
        h = policy.step(h, e, tok)
        tok = torch.multinomial(policy.next_logps(h).exp(), 1, generator=gen).squeeze(1)  # (G·k,)
        out.append(tok)
    return torch.stack(out, 1).view(len(prompts), k, policy.length)


def train_online(
    policy: SeqPolicy,
    loss: str,
    k: int,
    reuse: int,
    sft_logps: torch.Tensor,
    rewards: torch.Tensor,
    *,
    beta_pi: float,
    beta_r: float,
    steps: int,
    batch: int,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    gen: torch.Generator,
    on_step: Callable[[int], None],
) -> dict[str, float]:
    """Train ``policy`` in place for ``steps`` online steps; return ``{"ess": …, "ess_q": …}``.

    ``ess`` is the mean over steps and groups of ``(1/Σp²)/K`` for the loss's policy distribution
    ``p = softmax(β_π (log π_θ − ref))``; ``ess_q`` the same for the target q. ``sft_logps``/``rewards``:
    ``[P, N]`` float32 tables. ``on_step(step)`` runs after every optimiser step (progress, curves).
    """
    fn, info = get_loss(loss), loss_info(loss)
    p_count, g = sft_logps.shape[0], batch // k
    ess_p = ess_q = 0.0
    for step in range(1, steps + 1):
        fresh = (step - 1) % reuse == 0
        if fresh:
            x = torch.randint(p_count, (g,), generator=gen)  # (G,)
            seqs = sample_sequences(policy, x, k, gen)  # (G, K, L)
            idx = seq_index(seqs, policy.vocab)  # (G, K)
            r, sft = rewards[x.unsqueeze(1), idx], sft_logps[x.unsqueeze(1), idx]  # (G, K) each
        logps = sequence_logps(policy, x.repeat_interleave(k), seqs.view(g * k, -1)).view(g, k)  # (G, K)
        if fresh:  # the sampler is the policy as it was when the round was drawn
            tg = online_targets(r, logps.detach(), sft, beta_pi, beta_r)
            given = {"shaped_rewards": tg.shaped_rewards, "sampler_logps": logps.detach()}
            kwargs = {name: given[name] for name in info.params if name in given}
        out = fn(logps, tg.ref_logps, tg.target_logprobs, beta_pi, **kwargs)
        ess_p += ess(masked_log_softmax(beta_pi * (logps.detach() - tg.ref_logps), None)).mean().item()
        ess_q += ess(tg.target_logprobs).mean().item()
        opt.zero_grad()
        out.losses.mean().backward()
        opt.step()
        sched.step()
        on_step(step)
    return {"ess": ess_p / steps, "ess_q": ess_q / steps}

