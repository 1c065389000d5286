"""π_sft's log-probs of sampled completions, with π_sft's prompt work done once per evaluation process.

The KL of every checkpoint needs ``log π_sft(y|x)`` of that checkpoint's samples. The completions change from
checkpoint to checkpoint, the prompts do not: π_sft's KV cache of each batch of prompts (all but the last prompt
token: the sampler's own prefill, :func:`~exoalign.sampling.prompt_prefill`, with the prompts' shared start
computed once) is computed once and kept, and each checkpoint's pass runs only ``[last prompt token, y_1 …
y_{C−1}]`` against it, ``k`` rows per prompt. At the demo's shape (≈ 40-token prompts, 29 of them a shared chat
template, 24-token completions) that is under half of a full forward pass. π_sft's own sampling (as a checkpoint,
as the win-rate baseline) takes its prefill from the same kept caches (:class:`~exoalign.sampling.HFSampler`'s
``prompt_caches``), so a process computes each batch's prompts on π_sft once.

The kept cache is the same computation as a fresh one (same shapes, same kernels), so a checkpoint's numbers do
not depend on whether the cache was warm (``tests/test_eval_cache.py``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..logprobs import IGNORE, completion_token_logps, position_ids_from_mask
from ..sampling import prompt_prefill


class PrefixCachedLogps:
    """``log π(y|x)`` summed over each completion at ``temperature``, for one model, with its prompt KV caches kept.

    Call it once per generation batch (prompts and their groups of completions); batches are keyed by their
    prompts' token ids, so any later evaluation in the process (another checkpoint, another run) that sends the
    same batch reuses its cache.
    """

    def __init__(self, model: torch.nn.Module, pad_id: int, temperature: float, budget_mb: float = 1024) -> None:
        self.model, self.pad_id, self.temperature = model, pad_id, temperature
        self.device = next(model.parameters()).device
        self.budget = budget_mb * 2**20  # bytes of kept caches; a batch beyond it is computed and not kept
        self.kept_bytes = 0
        self._kept: dict[tuple, tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.hits = self.misses = 0

    def _prompt_state(self, prompt_ids: Sequence[list[int]]) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(cache of all but the last prompt column or None, last column's ids ``(B,)``, prompt mask ``(B, P)``,
        prompt positions ``(B, P)``) of a batch, computed on its first use."""
        key = tuple(tuple(p) for p in prompt_ids)
        if key in self._kept:
            self.hits += 1
            return self._kept[key]
        self.misses += 1
        cache, ids, mask = prompt_prefill(self.model, prompt_ids, self.pad_id)  # (B, P) in the sampler's layout
        pos = position_ids_from_mask(mask)  # (B, P); the last column is every row's last prompt token
        state = (cache, ids[:, -1], mask, pos)
        size = _cache_bytes(cache)
        if self.kept_bytes + size <= self.budget:
            self._kept[key] = state
            self.kept_bytes += size
        return state

    def release(self, prompt_ids: Sequence[list[int]]) -> None:
        """Drop the batch's kept cache (a pass needed for one batch only, e.g. a checkpoint's own)."""
        state = self._kept.pop(tuple(tuple(p) for p in prompt_ids), None)
        if state is not None:
            self.kept_bytes -= _cache_bytes(state[0])

    @torch.no_grad()
    def prompt_cache(self, prompt_ids: Sequence[list[int]]) -> Any:
        """A copy of the batch's prompt KV cache (kept or computed now), for the sampler to decode from; None for
        a batch of one-token prompts."""
        cache = self._prompt_state(prompt_ids)[0]
        return copy.deepcopy(cache) if cache is not None else None

    @torch.no_grad()
    def __call__(self, prompt_ids: Sequence[list[int]], completions: Sequence[Sequence[list[int]]]) -> np.ndarray:
        """``[len(prompt_ids), k]`` float64 sums of ``log π(y_t | x, y_<t)`` (``completions[i]``: k id lists)."""
        k = len(completions[0])
        cache, last, mask, pos = self._prompt_state(prompt_ids)
        rows = [c for g in completions for c in g]  # row r = (prompt r // k, completion r % k)
        R, C = len(rows), max(max(len(c) for c in rows), 1)
        tail = torch.full((R, C), self.pad_id, dtype=torch.long)  # (R, C): last prompt token, y_1 … y_{C−1}
        tail[:, 0] = last.cpu().repeat_interleave(k)
        targets = torch.full((R, C), IGNORE, dtype=torch.long)  # (R, C): y_1 … y_C
        for r, c in enumerate(rows):
            tail[r, 1:len(c)] = torch.tensor(c[:-1], dtype=torch.long)
            targets[r, :len(c)] = torch.tensor(c, dtype=torch.long)
        tail, targets = tail.to(self.device), targets.to(self.device)
        keep = targets != IGNORE  # (R, C); padded columns feed nothing that is read
        tail_mask = keep.long()
        tail_mask[:, 0] = 1  # the last prompt token
        full_mask = torch.cat([mask[:, :-1].repeat_interleave(k, 0), tail_mask], 1)  # (R, P − 1 + C)
        tail_pos = pos[:, -1:].repeat_interleave(k, 0) + torch.arange(C, device=self.device)  # (R, C)
        inputs: dict[str, Any] = {"input_ids": tail, "attention_mask": full_mask, "position_ids": tail_pos}
        if cache is not None:
            rows_cache = copy.deepcopy(cache)  # the forward appends to it; the kept one stays the prompt's
            if k > 1:
                rows_cache.batch_repeat_interleave(k)
            inputs["cache"] = rows_cache
        lp = completion_token_logps(self.model, keep, targets[keep], temperature=self.temperature,
                                    **inputs)  # (n_tokens,)
        which = keep.nonzero()[:, 0]  # (n_tokens,) row of each token, row-major like lp
        sums = torch.zeros(R, dtype=torch.float64, device=lp.device).index_add(0, which, lp.double())  # (R,)
        return sums.cpu().numpy().reshape(len(prompt_ids), k)


def _cache_bytes(cache: Any) -> int:
    """Bytes held by a KV cache's tensors (0 for none)."""
    if cache is None:
        return 0
    return sum(t.numel() * t.element_size() for layer in cache.layers
               for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if isinstance(t, torch.Tensor))
