"""``exoalign label``: preference pairs ``{"prompt", "chosen", "rejected", "rewards"}`` from scored groups.

    exoalign label input=scored.jsonl output=pairs.jsonl method=best_worst
    exoalign label input=scored.jsonl output=pairs.jsonl method=bradley_terry pairs_per_group=2 seed=0

Two methods:

* ``best_worst`` — chosen = the completion with the highest reward, rejected = the one with the lowest (the
  first of equals). A group whose spread ``max r − min r`` is not above ``min_margin`` carries no preference
  and is skipped (counted in the summary).
* ``bradley_terry`` — simulate a rater who prefers ``a`` over ``b`` with the Bradley–Terry probability
  ``P(a ≻ b) = σ((r_a − r_b) / bt_scale)``: for each group draw ``pairs_per_group`` distinct unordered pairs
  ``{a, b}`` uniformly, then draw the winner with that probability. Rewards read as logits of preference
  (the scale a Bradley–Terry reward model learns) give ``bt_scale = 1``; a larger scale gives noisier labels.
  Draws use a random stream seeded by ``(seed, row index)``, so labels are reproducible and do not depend on
  the other rows.

Each pair keeps the group's extra fields and carries ``"rewards": [r_chosen, r_rejected]``. The output is
written atomically (the stage is fast, so there is nothing to resume).
"""

from __future__ import annotations

import itertools
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..config import require, stage_args
from ..data import PER_COMPLETION, load_rows, reorder, write_rows
from ..errors import InputError


@dataclass
class LabelConfig:
    """``exoalign label``: make chosen/rejected pairs from groups with rewards."""

    input: str = ""
    """Scored group rows (output of exoalign score)."""
    split: str = "train"
    """Split to read from a hub dataset or a DatasetDict directory."""
    output: str = ""
    """Output JSONL of pair rows {"prompt", "chosen", "rejected", "rewards"}."""
    method: Literal["best_worst", "bradley_terry"] = "best_worst"
    """best_worst: highest vs lowest reward. bradley_terry: random pairs, winner drawn with σ((r_a − r_b)/bt_scale)."""
    min_margin: float = 0.0
    """best_worst: skip groups whose best − worst reward is not above this (equal rewards carry no preference)."""
    pairs_per_group: int = 1
    """bradley_terry: distinct pairs drawn per group (at most K(K−1)/2)."""
    bt_scale: float = 1.0
    """bradley_terry: reward scale of the preference probability (larger = noisier labels)."""
    seed: int = 0
    """bradley_terry: seed of the per-row random streams."""

    def __post_init__(self) -> None:
        require(self.min_margin >= 0 and math.isfinite(self.min_margin), "min_margin", "must be >= 0", "use e.g. 0")
        require(self.pairs_per_group >= 1, "pairs_per_group", "must be >= 1", "use e.g. 1")
        require(self.bt_scale > 0 and math.isfinite(self.bt_scale), "bt_scale", "must be > 0", "use e.g. 1.0")


def _pair(row: dict[str, Any], a: int, b: int) -> dict[str, Any]:
    """Pair row with chosen = completion ``a``, rejected = completion ``b``; per-completion fields (rewards,
    finished, completion_ids) follow them as ``[a, b]``, other extra fields are copied."""
    picked = reorder(row, [a, b])
    extras = {k: v for k, v in picked.items() if k not in ("prompt", "completions") and
              (k not in PER_COMPLETION or v is not None)}
    return {"prompt": row["prompt"], "chosen": picked["completions"][0], "rejected": picked["completions"][1], **extras}


def best_worst(row: dict[str, Any], min_margin: float = 0.0) -> list[dict[str, Any]]:
    """``[pair(best, worst)]``, or ``[]`` when the reward spread is not above ``min_margin``."""
    r = row["rewards"]
    best = max(range(len(r)), key=lambda i: (r[i], -i))  # first of equal maxima
    worst = min(range(len(r)), key=lambda i: (r[i], i))  # first of equal minima
    if r[best] - r[worst] <= min_margin:
        return []
    return [_pair(row, best, worst)]


def bradley_terry(row: dict[str, Any], index: int, *, pairs: int = 1, scale: float = 1.0, seed: int = 0) -> list[dict[str, Any]]:
    """``pairs`` pairs drawn as in the module docstring, from the stream seeded by ``(seed, index)``."""
    rng = random.Random(f"label:{seed}:{index}")
    r = row["rewards"]
    candidates = list(itertools.combinations(range(len(r)), 2))
    out = []
    for a, b in rng.sample(candidates, min(pairs, len(candidates))):
        z = (r[a] - r[b]) / scale
        p_a = 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))  # σ(z), no overflow
        out.append(_pair(row, a, b) if rng.random() < p_a else _pair(row, b, a))
    return out


def make_pairs(rows: list[dict[str, Any]], cfg: LabelConfig) -> tuple[list[dict[str, Any]], int]:
    """All pair rows, and how many groups gave none."""
    pairs, skipped = [], 0
    for index, row in enumerate(rows):
        if cfg.method == "best_worst":
            got = best_worst(row, cfg.min_margin)
        else:
            got = bradley_terry(row, index, pairs=cfg.pairs_per_group, scale=cfg.bt_scale, seed=cfg.seed)
        skipped += not got
        pairs.extend(got)
    return pairs, skipped


def run(cfg: LabelConfig) -> Path:
    for name in ("input", "output"):
        require(bool(getattr(cfg, name)), name, "not set", f"set {name}=… to a .jsonl path")
    require(Path(cfg.output).suffix == ".jsonl", "output", "must be a .jsonl file", "name it e.g. pairs.jsonl")
    rows = load_rows(cfg.input, "group", split=cfg.split, require_rewards=True)
    pairs, skipped = make_pairs(rows, cfg)
    if not pairs:
        raise InputError(f"no pairs: in all {len(rows)} groups the rewards are tied (spread <= {cfg.min_margin})",
                         file=cfg.input, field="rewards", fix="check the scoring, or lower min_margin")
    path = write_rows(cfg.output, pairs)
    print(f"{len(pairs)} pairs from {len(rows)} groups ({skipped} skipped: tied rewards)", file=sys.stderr)
    return path


def main(argv: list[str] | None = None) -> int:
    cfg = stage_args("exoalign label", LabelConfig, argv, description=__doc__.split("\n\n")[0])
    path = run(cfg)
    print(f"wrote {path}")
    return 0
