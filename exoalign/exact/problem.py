"""The enumerable sequence task of the exact-optimum benchmark: prompts, a small GRU policy, π_sft, a reward.

Every completion is a sequence ``y = (y_1 … y_L)`` of ``L`` tokens from a vocabulary of ``V``; there are
``N = V^L`` of them (a few thousand to 65k), so every probability, expectation and KL below is an exact
sum over all sequences, not an estimate. Sequences are indexed in lexicographic order,
``index(y) = Σ_t y_t V^{L−1−t}``, which is the order in which :func:`enumerate_logps` lays them out.

* :class:`SeqPolicy` — an autoregressive GRU ``π_θ(y|x) = Π_t π_θ(y_t | x, y_<t)`` with a small hidden state
  (limited capacity: it cannot represent every distribution over ``V^L`` sequences).
* :func:`sft_target` — a multimodal distribution per prompt (a mixture of noisy copies of a few centre
  sequences); :func:`fit_sft` fits the policy to it by exact maximum likelihood, giving π_sft.
* :func:`reward_table` — a known reward with two peaks of unequal height, one near a frequent SFT mode and
  one near a rare one, so that ``π*_β ∝ π_sft exp(r/β)`` is multimodal with unequal modes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class SeqTaskSpec:
    """Shape of the sequence task; everything random about it is drawn from ``seed``."""

    vocab: int
    length: int
    prompts: int
    seed: int
    sft_modes: int = 3
    """Number of centre sequences in the SFT mixture."""
    sft_noise: float = 0.45
    """Per-token probability that an SFT sample leaves its mode's centre for a uniform token."""
    reward_scale: float = 4.0
    """Height of the highest reward peak, in Bradley–Terry units (P(y ≻ y') = σ(r − r'))."""

    @property
    def size(self) -> int:
        return self.vocab**self.length


def all_sequences(vocab: int, length: int) -> torch.Tensor:
    """Every sequence of ``length`` tokens over ``vocab``, in lexicographic order: ``[V^L, L]`` long."""
    idx = torch.arange(vocab**length)
    powers = vocab ** torch.arange(length - 1, -1, -1)
    return (idx.unsqueeze(1) // powers) % vocab  # (N, L)


def seq_index(seqs: torch.Tensor, vocab: int) -> torch.Tensor:
    """Lexicographic index of each sequence: ``[..., L]`` → ``[...]``."""
    length = seqs.shape[-1]
    powers = vocab ** torch.arange(length - 1, -1, -1, device=seqs.device)
    return (seqs * powers).sum(-1)


class SeqPolicy(nn.Module):
    """Autoregressive GRU policy over ``V^L`` sequences, conditioned on a prompt id.

    ``h_0 = tanh(W e_x)``, ``h_t = GRU(emb(y_{t−1}) + e_x, h_{t−1})`` with ``y_0 = BOS``, and
    ``π_θ(y_t | x, y_<t) = softmax(head(h_t))``. The hidden width bounds what the policy can represent.
    """

    def __init__(self, vocab: int, length: int, prompts: int, hidden: int = 16, embed: int = 16) -> None:
        super().__init__()
        self.vocab, self.length = vocab, length
        self.prompt_emb = nn.Embedding(prompts, embed)
        self.tok_emb = nn.Embedding(vocab + 1, embed)  # last id = BOS
        self.init = nn.Linear(embed, hidden)
        self.rnn = nn.GRU(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def start(self, prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Initial hidden state and the prompt embedding: ``[N]`` → ``([N, H], [N, E])``."""
        e = self.prompt_emb(prompts)
        return torch.tanh(self.init(e)), e

    def step(self, h: torch.Tensor, e: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        """Feed token ``tok`` ``[N]``: ``h [N, H]`` → ``[N, H]``."""
        out, _ = self.rnn((self.tok_emb(tok) + e).unsqueeze(1), h.unsqueeze(0))  # (N, 1, H)
        return out.squeeze(1)

    def run(self, prompts: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Hidden states after feeding ``inputs [N, T]`` (teacher forcing, one fused GRU call): ``[N, T, H]``."""
        h, e = self.start(prompts)
        out, _ = self.rnn(self.tok_emb(inputs) + e.unsqueeze(1), h.unsqueeze(0))
        return out

    def next_logps(self, h: torch.Tensor) -> torch.Tensor:
        """Next-token log-probabilities ``[N, V]``."""
        return torch.log_softmax(self.head(h), dim=-1)

    def bos(self, n: int, device: torch.device | None = None) -> torch.Tensor:
        return torch.full((n,), self.vocab, dtype=torch.long, device=device)


def sequence_logps(policy: SeqPolicy, prompts: torch.Tensor, seqs: torch.Tensor) -> torch.Tensor:
    """``log π_θ(y|x)`` as the sum of token log-probs (teacher forcing): ``prompts [N]``, ``seqs [N, L]`` → ``[N]``.

    This is how the trained methods get the sequence log-probs their losses need, exactly as a language
    model's completion log-prob is the sum over completion tokens.
    """
    inputs = torch.cat([policy.bos(len(prompts), seqs.device).unsqueeze(1), seqs[:, :-1]], dim=1)  # (N, L)
    h = policy.run(prompts, inputs)  # (N, L, H): the state after BOS, y_1, …, y_{L−1} predicts y_1, …, y_L
    lp = policy.next_logps(h)  # (N, L, V)
    return lp.gather(-1, seqs.unsqueeze(-1)).squeeze(-1).sum(-1)  # (N,)


def enumerate_logps(policy: SeqPolicy, prompts: torch.Tensor) -> torch.Tensor:
    """``log π_θ(y|x)`` for every sequence ``y`` and prompt: ``prompts [P]`` → ``[P, V^L]`` (lexicographic).

    Walks the prefix tree depth by depth: at depth ``t`` there are ``V^t`` prefixes per prompt, so the whole
    table costs ``Σ_t V^t ≈ V^L / (V − 1)`` GRU steps per prompt instead of ``L · V^L``.
    """
    v, p = policy.vocab, len(prompts)
    h, e = policy.start(prompts)  # (P, H), (P, E)
    h = policy.step(h, e, policy.bos(p, prompts.device))
    cum = torch.zeros(p, 1, dtype=h.dtype, device=h.device)  # (P, V^t) log-prob of each prefix
    for t in range(policy.length):
        n_prefix = cum.shape[1]
        lp = policy.next_logps(h).view(p, n_prefix, v)  # (P, V^t, V)
        cum = (cum.unsqueeze(-1) + lp).reshape(p, n_prefix * v)  # (P, V^{t+1}), prefix-major = lexicographic
        if t + 1 < policy.length:
            # every prefix gets V children: repeat its state V times, feed tokens 0..V-1 in order
            h = h.repeat_interleave(v, dim=0)  # (P·V^{t+1}, H)
            e_rep = e.repeat_interleave(n_prefix * v, dim=0)  # (P·V^{t+1}, E)
            tok = torch.arange(v, device=h.device).repeat(p * n_prefix)  # (P·V^{t+1},)
            h = policy.step(h, e_rep, tok)
    return cum


def _centres(spec: SeqTaskSpec, gen: torch.Generator) -> torch.Tensor:
    """SFT mode centres ``[P, M, L]``: distinct random sequences per prompt."""
    out = torch.empty(spec.prompts, spec.sft_modes, spec.length, dtype=torch.long)
    for x in range(spec.prompts):
        idx = torch.randperm(spec.size, generator=gen)[: spec.sft_modes]
        out[x] = all_sequences(spec.vocab, spec.length)[idx]
    return out


@dataclass(frozen=True)
class SeqTask:
    """The task instance: SFT target, mode centres, reward goals and the reward of every sequence."""

    spec: SeqTaskSpec
    sft_probs: torch.Tensor
    """``[P, N]`` the multimodal distribution π_sft is fitted to (float64, rows sum to 1)."""
    centres: torch.Tensor
    """``[P, M, L]`` SFT mode centres, most frequent first."""
    goals: torch.Tensor
    """``[P, 2, L]`` reward peaks: goal 0 (reward A) near the rarest SFT mode, goal 1 (reward A/2) near the most
    frequent one."""
    rewards: torch.Tensor
    """``[P, N]`` float64 reward of every sequence."""


def _mutate(seq: torch.Tensor, vocab: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """``seq`` with ``n`` positions changed to a different token."""
    out = seq.clone()
    pos = torch.randperm(len(seq), generator=gen)[:n]
    for i in pos.tolist():
        out[i] = (out[i] + 1 + torch.randint(vocab - 1, (1,), generator=gen).item()) % vocab
    return out


def build_task(spec: SeqTaskSpec) -> SeqTask:
    """Draw the task for ``spec``.

    SFT target (per prompt ``x``) — a mixture of noisy copies of ``M`` centres ``c_m`` with weights ∝ 2^{-m}::

        q_sft(y|x) = Σ_m w_m Π_t [(1 − δ) 1{y_t = c_{m,t}} + δ / V]

    Reward — two peaks, the higher one (``A``) one token away from the *rarest* centre and the lower one
    (``A/2``) one token away from the *most frequent* centre, with ``s(y, g)`` the fraction of positions where
    ``y`` agrees with ``g``::

        r(x, y) = A · max(s(y, g_0), ½ s(y, g_1))

    so π*_β ∝ π_sft e^{r/β} keeps mass near the frequent mode (large prior, moderate reward) and moves mass to
    the rare one (small prior, high reward): two unequal modes that a small GRU struggles to hold both of.
    """
    gen = torch.Generator().manual_seed(spec.seed)
    seqs = all_sequences(spec.vocab, spec.length)  # (N, L)
    centres = _centres(spec, gen)  # (P, M, L)
    w = torch.tensor([2.0**-m for m in range(spec.sft_modes)], dtype=torch.float64)
    w = w / w.sum()
    hit = (seqs.unsqueeze(0).unsqueeze(0) == centres.unsqueeze(2)).double()  # (P, M, N, L)
    tok_p = (1 - spec.sft_noise) * hit + spec.sft_noise / spec.vocab
    sft_probs = (w.view(1, -1, 1) * tok_p.prod(-1)).sum(1)  # (P, N)
    goals = torch.stack(
        [
            torch.stack([_mutate(centres[x, -1], spec.vocab, 1, gen), _mutate(centres[x, 0], spec.vocab, 1, gen)])
            for x in range(spec.prompts)
        ]
    )  # (P, 2, L)
    sim = (seqs.unsqueeze(0).unsqueeze(0) == goals.unsqueeze(2)).double().mean(-1)  # (P, 2, N)
    rewards = spec.reward_scale * torch.maximum(sim[:, 0], 0.5 * sim[:, 1])  # (P, N)
    return SeqTask(spec, sft_probs / sft_probs.sum(-1, keepdim=True), centres, goals, rewards)


def fit_sft(
    policy: SeqPolicy, target: torch.Tensor, steps: int, lr: float = 1e-2, progress: bool = False
) -> float:
    """Fit ``policy`` to ``target`` ``[P, N]`` by exact maximum likelihood: minimise ``KL(q_sft ‖ π_θ)``.

    The cross-entropy ``−Σ_y q(y|x) log π_θ(y|x)`` is computed over all sequences, so the fit has no
    sampling noise. Returns the final ``KL(q_sft ‖ π_θ)`` averaged over prompts (the capacity shortfall).
    """
    from tqdm.auto import tqdm

    prompts = torch.arange(target.shape[0])
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    q = target.float()
    ent = torch.special.xlogy(target, target).sum(-1).mean().item()  # −H(q)
    kl = math.nan
    for _ in tqdm(range(steps), desc="fit π_sft", disable=not progress, leave=False):
        ce = -(q * enumerate_logps(policy, prompts)).sum(-1).mean()
        opt.zero_grad()
        ce.backward()
        opt.step()
        kl = ce.item() + ent
    return kl
