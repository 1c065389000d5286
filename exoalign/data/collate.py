"""Batching tokenised groups: :class:`GroupCollator`.

A batch of B groups becomes ``B*K`` sequences (K = the largest group in the batch), group-major: row
``b*K + k`` is completion k of group b. Within each sequence the prompt is LEFT-padded to the batch's longest
prompt P and the completion RIGHT-padded to the batch's longest completion C, so every completion starts at
column P (what ``exoalign.logprobs.sequence_logps`` expects)::

    group 0, k=0   [pad  p  p | c  c  c  EOS]      labels: -100 … -100 | c c c EOS
    group 0, k=1   [pad  p  p | c  EOS pad pad]    labels: -100 … -100 | c EOS -100 -100
    group 1, k=0   [ p   p  p | c  c  EOS pad]
    group 1, k=1   [ p   p  p | pad pad pad pad]   a missing slot (group 1 has one completion):
                                                   prompt only, no label, group_mask[1, 1] = False
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

IGNORE = -100


class GroupCollator:
    """Features of :class:`~exoalign.data.tokenize.TokenizedData` → a padded batch of groups.

    Returns ``input_ids``, ``attention_mask``, ``labels`` ``[B*K, T]`` (T = P + C, the batch's own longest, never
    a global maximum), ``group_mask [B, K]`` bool, ``lengths [B, K]`` (completion tokens, 0 in missing slots),
    ``index [B]``, ``rewards [B, K]`` float (only when every group has rewards; 0 in missing slots, so it is
    NaN-free) and ``ref_logps [B, K]`` (only when every feature carries them; 0 in missing slots).
    """

    def __init__(self, pad_token_id: int) -> None:
        if pad_token_id is None:
            raise ValueError("GroupCollator needs a pad_token_id (set tokenizer.pad_token)")
        self.pad_token_id = int(pad_token_id)

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        B = len(features)
        if B == 0:
            raise ValueError("empty batch")
        K = max(len(f["completion_ids"]) for f in features)
        P = max(len(f["prompt_ids"]) for f in features)
        C = max((len(c) for f in features for c in f["completion_ids"]), default=0)
        T = P + C
        pad = self.pad_token_id
        # Built as Python lists and turned into tensors once: far cheaper than many small slice assignments.
        ids_rows, mask_rows, label_rows = [], [], []
        lengths = [[0] * K for _ in range(B)]
        group_mask = [[False] * K for _ in range(B)]
        for b, f in enumerate(features):
            prompt = list(f["prompt_ids"])
            lp = len(prompt)
            left_ids, left_mask = [pad] * (P - lp) + prompt, [0] * (P - lp) + [1] * lp
            comps = f["completion_ids"]
            for k in range(K):
                # A missing slot (k >= len(comps)) still holds the prompt: a harmless sequence with no labels,
                # rather than an all-pad row that some attention kernels turn into NaN.
                comp = list(comps[k]) if k < len(comps) else []
                lc, fill = len(comp), C - len(comp)
                ids_rows.append(left_ids + comp + [pad] * fill)
                mask_rows.append(left_mask + [1] * lc + [0] * fill)
                label_rows.append([IGNORE] * P + comp + [IGNORE] * fill)
                lengths[b][k] = lc
                group_mask[b][k] = k < len(comps)
        batch = {
            "input_ids": torch.tensor(ids_rows, dtype=torch.long).view(B * K, T),  # (B*K, T), group-major
            "attention_mask": torch.tensor(mask_rows, dtype=torch.long).view(B * K, T),
            "labels": torch.tensor(label_rows, dtype=torch.long).view(B * K, T),
            "group_mask": torch.tensor(group_mask, dtype=torch.bool),  # (B, K)
            "lengths": torch.tensor(lengths, dtype=torch.long),  # (B, K)
            "index": torch.tensor([int(f.get("index", b)) for b, f in enumerate(features)], dtype=torch.long),
        }
        for key in ("rewards", "ref_logps"):
            values = [f.get(key) for f in features]
            if all(v is not None for v in values):
                batch[key] = self._per_slot(values, K)
            elif key == "ref_logps" and any(v is not None for v in values):
                raise ValueError("some features carry ref_logps and some do not")
        return batch

    @staticmethod
    def _per_slot(values: list[Sequence[float]], K: int) -> torch.Tensor:
        """``[B, K]`` float32 from ragged per-group lists; missing slots are 0 (masked by group_mask)."""
        return torch.tensor([[float(x) for x in v] + [0.0] * (K - len(v)) for v in values], dtype=torch.float32)
