"""Tokenising normalised rows once: :func:`tokenize_rows` → :class:`TokenizedData`.

Truncation policy (counted in ``.stats``):

1. The prompt is tokenised and, when longer than ``max_prompt_length``, cut from the LEFT: its end — the part
   next to the completion — is what conditions the completion most, so it is what is kept.
2. Each completion is tokenised without special tokens and EOS is appended — unless the row says the
   completion did not finish (``"finished": [..., false, ...]``, written by ``exoalign sample`` for a
   completion cut at ``max_new_tokens``): the policy is never trained on an end it did not produce. Rows
   without ``finished`` (hand-written data, pairs from elsewhere) get EOS on every completion, as a finished
   answer. When the row carries the sampled ``completion_ids`` and they still decode to the completion's text,
   those ids are used as they are (the stop token included when finished), so log-probs are of exactly the
   tokens sampled; re-tokenising the text may segment it differently. When prompt + completion is longer
   than ``max_length``, the completion is cut on the RIGHT to ``max_length − len(prompt)`` tokens. EOS is
   the last token, so it is kept only when the whole completion fits: a cut completion ends mid-text and is
   scored as such, never as if the model had chosen to stop there.

The prompt is encoded by :func:`exoalign.data.encode.encode_prompts`, the encoder sampling and evaluation use
too: the tokeniser's own special tokens (e.g. Llama's BOS), unless its text already starts with the BOS token
(a chat template put it there). The work is done on plain Python lists with the fast
tokeniser's batch call — cheap next to one forward pass — not through ``datasets.Dataset.map``; what is
worth caching is the reference log-probs, keyed by :attr:`TokenizedData.fingerprint`.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError
from .encode import encode_prompts


def tokenizer_hash(tokenizer: Any) -> str:
    """A hash of the tokeniser's vocabulary and special tokens: what decides the ids it gives."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = {"eos": tokenizer.eos_token_id, "bos": tokenizer.bos_token_id, "pad": tokenizer.pad_token_id}
    text = json.dumps([vocab, special, type(tokenizer).__name__], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass
class TokenizedData:
    """Tokenised rows, usable directly as a map-style dataset for a ``DataLoader`` + :class:`GroupCollator`.

    ``features[i]`` is ``{"index": i, "prompt_ids": [int], "completion_ids": [[int], ...] (K lists),
    "rewards": [float] | None}`` (plus ``"ref_logps"`` after :meth:`with_ref_logps`).
    """

    features: list[dict[str, Any]]
    stats: dict[str, int] = field(default_factory=dict)
    """``rows``, ``truncated_prompts``, ``truncated_completions`` (completions cut, counted one by one); for
    sampled rows also ``unfinished_completions`` (no EOS appended), ``sampled_ids`` (stored ids used) and
    ``stale_ids`` (stored ids that no longer decode to the text, so the text was tokenised)."""
    fingerprint: str = ""
    """Stable hash of the token ids (not the rewards) and the tokeniser: the reference-cache key's data part."""

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.features[i]

    def with_ref_logps(self, ref_logps: Sequence[Sequence[float]]) -> TokenizedData:
        """A copy whose features carry ``ref_logps`` (one value per completion of each row)."""
        if len(ref_logps) != len(self.features):
            raise ValueError(f"{len(ref_logps)} ref_logps rows for {len(self.features)} features")
        feats = []
        for feat, ref in zip(self.features, ref_logps):
            if len(ref) != len(feat["completion_ids"]):
                raise ValueError(f"row {feat['index']}: {len(ref)} ref_logps for {len(feat['completion_ids'])} completions")
            feats.append({**feat, "ref_logps": [float(x) for x in ref]})
        return TokenizedData(feats, dict(self.stats), self.fingerprint)


def _row_completions(row: dict[str, Any], i: int) -> list[str]:
    if "completions" in row:
        return list(row["completions"])
    if "completion" in row:  # an sft row is a group of one
        return [row["completion"]]
    raise InputError(f"row {i + 1} has no completions", field="completions",
                     fix="tokenise pair, group or sft rows (load them with load_rows)")


def _decode(tokenizer: Any, ids: list[int]) -> str | None:
    """The text of ``ids`` as the sampler decoded it (special tokens skipped); None for ids it cannot decode."""
    try:
        return tokenizer.decode(ids, skip_special_tokens=True)
    except (OverflowError, TypeError, ValueError, IndexError):
        return None


def _completion_ids(tokenizer: Any, rows: Sequence[dict[str, Any]], groups: list[list[str]],
                    stats: dict[str, int]) -> list[list[int]]:
    """The token ids of every completion, flat in row order, EOS appended as the module docstring says."""
    eos = tokenizer.eos_token_id
    flat = [c for g in groups for c in g]
    text_ids = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    sampled = [row if "completions" in row else {} for row in rows]  # sft rows are never sampled rows
    stored_flat = [ids for row, g in zip(sampled, groups) for ids in (row.get("completion_ids") or [None] * len(g))]
    finished = [f for row, g in zip(sampled, groups) for f in (row.get("finished") or [True] * len(g))]
    have = [i for i, ids in enumerate(stored_flat) if ids is not None]
    usable = {i for i in have if _decode(tokenizer, stored_flat[i]) == flat[i]}
    out = []
    for i, ids in enumerate(text_ids):
        if i in usable:
            out.append(list(stored_flat[i]))  # exactly as sampled, with its stop token when it finished
        else:
            out.append(list(ids) + [eos] if finished[i] else list(ids))
    if have or any(row.get("finished") is not None for row in sampled):
        stats["unfinished_completions"] = sum(not f for f in finished)
        stats["sampled_ids"] = len(usable)
        stats["stale_ids"] = len(have) - len(usable)
    return out


def tokenize_rows(rows: Sequence[dict[str, Any]], tokenizer: Any, *, max_length: int,
                  max_prompt_length: int) -> TokenizedData:
    """Tokenise normalised pair/group/sft rows with the truncation policy of the module docstring."""
    if not (isinstance(max_length, int) and isinstance(max_prompt_length, int) and 0 < max_prompt_length < max_length):
        raise InputError(f"need 0 < max_prompt_length < max_length, got {max_prompt_length} and {max_length}",
                         field="max_prompt_length", fix="leave room for the completion: max_prompt_length < max_length")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InputError("the tokeniser has no EOS token", field="tokenizer", fix="set tokenizer.eos_token")
    groups = [_row_completions(row, i) for i, row in enumerate(rows)]
    prompts = [row["prompt"] for row in rows]
    all_prompt_ids = encode_prompts(tokenizer, prompts)
    sampled_stats: dict[str, int] = {}
    flat_ids = _completion_ids(tokenizer, rows, groups, sampled_stats)

    features, cut_prompts, cut_completions, pos = [], 0, 0, 0
    digest = hashlib.sha256(tokenizer_hash(tokenizer).encode())
    for i, (row, prompt_ids, group) in enumerate(zip(rows, all_prompt_ids, groups)):
        if len(prompt_ids) > max_prompt_length:
            prompt_ids = prompt_ids[-max_prompt_length:]  # keep the end, next to the completion
            cut_prompts += 1
        budget = max_length - len(prompt_ids)
        completion_ids = []
        for ids in flat_ids[pos : pos + len(group)]:
            if len(ids) > budget:
                ids = ids[:budget]  # EOS is the last token: it goes first
                cut_completions += 1
            completion_ids.append(ids)
        pos += len(group)
        rewards = row.get("rewards")
        features.append({"index": i, "prompt_ids": list(prompt_ids), "completion_ids": completion_ids,
                         "rewards": None if rewards is None else [float(r) for r in rewards]})
        # Lengths before contents, so that ([1, 2], [3]) and ([1], [2, 3]) hash differently.
        digest.update(array("q", [len(prompt_ids), len(completion_ids), *map(len, completion_ids)]).tobytes())
        digest.update(array("q", [*prompt_ids, *(t for c in completion_ids for t in c)]).tobytes())
    stats = {"rows": len(features), "truncated_prompts": cut_prompts, "truncated_completions": cut_completions,
             **sampled_stats}
    return TokenizedData(features, stats, digest.hexdigest()[:16])
