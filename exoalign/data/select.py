"""Choosing ``k`` of a group's completions: :func:`select_k`.

A group may hold more completions than training uses (sample 8, train on 4). Three rules:

* ``best_worst`` — the top ⌈k/2⌉ and the bottom ⌊k/2⌋ by reward, best first (so ``k = 2`` gives
  ``[best, worst]``, a chosen/rejected pair). The widest reward spread for a given ``k``; needs rewards.
  Ties are broken by the original order.
* ``random`` — ``k`` completions drawn without replacement, seeded per row by ``(seed, row index)``, so the
  choice is reproducible and does not depend on the other rows; kept in their original order.
* ``first`` — the first ``k``.

Rows with ``k`` or fewer completions are kept whole (the collator masks the missing slots). Rewards and the
other per-completion fields (:data:`PER_COMPLETION`) follow their completions (:func:`reorder`); every other
field is copied unchanged.
"""

from __future__ import annotations

import math
import random
from typing import Any

from ..errors import InputError

HOWS = ("best_worst", "random", "first")
#: Row fields that hold one entry per completion, in the completions' order.
PER_COMPLETION = ("completions", "rewards", "finished", "completion_ids")


def reorder(row: dict[str, Any], order: list[int]) -> dict[str, Any]:
    """A copy of normalised ``row`` keeping completions ``order`` (in that order), with every per-completion
    field (rewards, finished flags, sampled ids) taken along; ``reorder(row, [1, 0])`` swaps a pair."""
    new = dict(row)
    for key in PER_COMPLETION:
        if row.get(key) is not None:
            new[key] = [row[key][i] for i in order]
    return new


def _pick(row: dict[str, Any], k: int, how: str, seed: int, index: int) -> list[int]:
    n = len(row["completions"])
    if n <= k:
        return list(range(n))
    if how == "first":
        return list(range(k))
    if how == "random":
        rng = random.Random(f"{seed}:{index}")  # string seeds hash deterministically across runs/platforms
        return sorted(rng.sample(range(n), k))
    rewards = row.get("rewards")
    if rewards is None:
        raise InputError(f"row {index + 1} has no rewards, and best_worst ranks completions by reward",
                         field="rewards", fix="score the groups first, or select with how='random' or 'first'")
    # Stable sort: best first, equal rewards in their original order.
    order = sorted(range(n), key=lambda i: -rewards[i])
    top, bottom = math.ceil(k / 2), k // 2
    return order[:top] + order[n - bottom :]


def select_k(rows: list[dict[str, Any]], k: int, how: str = "best_worst", seed: int = 0) -> list[dict[str, Any]]:
    """New rows keeping ``k`` completions (and their rewards) of each normalised group row; see module doc."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"k must be a positive integer, got {k!r}", field="k", fix="set k to 2 or more")
    if how not in HOWS:
        raise InputError(f"unknown selection {how!r}", field="how", fix=f"use one of {', '.join(HOWS)}")
    out = []
    for index, row in enumerate(rows):
        out.append(reorder(row, _pick(row, k, how, seed, index)))
    return out
