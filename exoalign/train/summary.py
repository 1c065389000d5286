"""The line ``train`` and ``sft`` end with, read from ``output_dir/metrics.jsonl``, and the warning when the run
cannot have changed the model.

    summary: 120 optimizer steps; loss 0.693 → 0.412; reward margin 0.01 → 1.9; accuracy 0.50 → 0.88;
             KL(π_sft‖π_θ) 0.35 nats (k1, last logged training batches)

The first and last values are those of the first and last logged windows (``train.log_every`` steps each).
An online run (``online.rounds >= 1``) ends with its rounds instead, from the per-round records (``online/*``)::

    summary: 12 rounds (12 optimizer steps); reward 0.191 → 0.318; KL(π_t‖π_sft) 0.092 nats (k1, last round's
             samples); ESS of the targets 0.81 → 0.74; held-out reward 0.2 → 0.33 (step 0 → 12), KL(π_θ‖π_sft)
             0.08 nats (eval.jsonl)

A run is flagged when it had fewer than :data:`MIN_STEPS` optimizer steps, or when the policy's drift from the
reference on the training data (``|kl/batch|``, the k1 estimate of ``KL(π_sft‖π_θ)``) stayed below
:data:`MIN_KL` nats in every logged window: an aligned model that close to π_sft samples essentially like it.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

MIN_STEPS = 20
"""Fewer optimizer steps than this cannot be expected to change a pretrained model."""
MIN_KL = 0.01
"""Drift from the reference (nats) below which the trained policy is, for sampling, still π_sft."""


@dataclass
class Summary:
    """What the end-of-run line reports; ``None`` where the run did not log it."""

    steps: int
    first: dict[str, float]
    """Metrics of the first logged window."""
    last: dict[str, float]
    """Metrics of the last logged window."""
    eval_last: dict[str, float]
    """The last held-out metrics (``eval/…``), if the run had held-out rows."""
    kl_max: float | None = None
    """The largest ``|kl/batch|`` of any logged window: how far the policy got from the reference at any point."""
    rounds: list[dict[str, float]] = field(default_factory=list)
    """An online run's per-round records (``online/*``, and ``heldout/*`` where it was evaluated), in order."""
    heldout: list[dict] = field(default_factory=list)
    """The points of ``output_dir/eval.jsonl`` (held-out reward and KL while training), in step order."""

    def get(self, key: str) -> tuple[float, float] | None:
        if key in self.first and key in self.last:
            return self.first[key], self.last[key]
        return None

    @property
    def kl(self) -> float | None:
        v = self.last.get("kl/batch")
        return None if v is None or not math.isfinite(v) else v


def read_summary(output_dir: str | Path) -> Summary | None:
    """The first and last logged training windows of ``output_dir/metrics.jsonl`` (None when nothing was logged)."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    train, evals, rounds = [], [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            continue
        if "online/round" in rec:
            rounds.append(rec)
        else:
            (evals if any(k.startswith("eval/") for k in rec) else train).append(rec)
    if not train:
        return None
    last_eval = {k: v for k, v in evals[-1].items() if k.startswith("eval/")} if evals else {}
    # Online, kl/batch is measured against the round's corrected reference (≈ 0); the drift is online/kl.
    kl_key, source = ("online/kl", rounds) if rounds else ("kl/batch", train)
    kls = [abs(r[kl_key]) for r in source if isinstance(r.get(kl_key), float) and math.isfinite(r[kl_key])]
    return Summary(steps=train[-1]["step"], first=train[0], last=train[-1], eval_last=last_eval,
                   kl_max=max(kls) if kls else None, rounds=rounds, heldout=_heldout_points(Path(output_dir)))


def _heldout_points(output_dir: Path) -> list[dict]:
    """The results in ``output_dir/eval.jsonl`` (one eval JSON per line), by step; torn lines skipped."""
    path = output_dir / "eval.jsonl"
    points = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                points += json.loads(line).get("results") or []
            except (json.JSONDecodeError, AttributeError):
                continue
    return sorted((p for p in points if isinstance(p, dict) and isinstance(p.get("step"), int)),
                  key=lambda p: p["step"])


def _heldout_part(s: Summary) -> str | None:
    if not s.heldout:
        return None
    a, b = s.heldout[0], s.heldout[-1]
    text = _arrow((a["reward"]["mean"], b["reward"]["mean"]), 3, a is b)
    return f"held-out reward {text} (step {a['step']} → {b['step']}), KL(π_θ‖π_sft) {b['kl']:.3g} nats (eval.jsonl)"


def _arrow(pair: tuple[float, float] | None, digits: int, one_window: bool) -> str | None:
    if pair is None:
        return None
    return f"{pair[1]:.{digits}g}" if one_window else f"{pair[0]:.{digits}g} → {pair[1]:.{digits}g}"


def _online_line(s: Summary) -> str:
    """An online run's line: rounds, reward and ESS of the first → last round, the last round's KL, held-out."""
    first, last, one = s.rounds[0], s.rounds[-1], len(s.rounds) == 1
    n = len(s.rounds)
    parts = [f"{n} round{'s' if n != 1 else ''} ({s.steps} optimizer step{'s' if s.steps != 1 else ''})"]
    for key, name, digits in (("online/reward", "reward", 3), ("online/kl", None, 3),
                              ("online/ess", "ESS of the targets", 2)):
        if key not in first or key not in last:
            continue
        if name is None:
            parts.append(f"KL(π_t‖π_sft) {last[key]:.{digits}g} nats (k1, last round's samples)")
        else:
            parts.append(f"{name} {_arrow((first[key], last[key]), digits, one)}")
    held = _heldout_part(s)
    if held:
        parts.append(held)
    return "summary: " + "; ".join(parts)


def summary_line(s: Summary) -> str:
    """``summary: N optimizer steps; loss a → b; …`` with whatever the run logged (one value when the run logged
    a single window); an online run's line reports its rounds."""
    if s.rounds:
        return _online_line(s)
    parts = [f"{s.steps} optimizer step{'s' if s.steps != 1 else ''}"]
    for key, name, digits in (("loss", "loss", 4), ("rewards/margins", "reward margin", 3),
                              ("rewards/accuracies", "accuracy", 2)):
        text = _arrow(s.get(key), digits, s.first is s.last)
        if text is not None:
            parts.append(f"{name} {text}")
    if s.kl is not None:
        parts.append(f"KL(π_sft‖π_θ) {s.kl:.3g} nats (k1, last logged training batches)")
    if "eval/loss" in s.eval_last:
        held = f"held-out loss {s.eval_last['eval/loss']:.4g}"
        if "eval/rewards/accuracies" in s.eval_last:
            held += f", accuracy {s.eval_last['eval/rewards/accuracies']:.2f}"
        parts.append(held)
    held = _heldout_part(s)
    if held:
        parts.append(held)
    return "summary: " + "; ".join(parts)


def too_small(s: Summary, *, lr: float) -> str | None:
    """Why the run cannot have changed the model (fewer than MIN_STEPS steps, KL below MIN_KL), or None."""
    why = []
    if s.steps < MIN_STEPS:
        why.append(f"only {s.steps} optimizer step{'s' if s.steps != 1 else ''} (fewer than {MIN_STEPS})")
    if s.kl_max is not None and s.kl_max < MIN_KL:  # at no logged window (a short last one can dip near 0)
        why.append(f"the policy moved at most {s.kl_max:.2g} nats from the reference (below {MIN_KL})")
    if not why:
        return None
    return (f"warning: this run cannot have changed the model much: {' and '.join(why)}. Fix: train longer "
            f"(train.epochs or train.max_steps, more rows) or raise the learning rate (train.lr={lr:g}; "
            "1e-5 suits a 135M model with a few hundred steps)")


def report(output_dir: str | Path, *, lr: float) -> Summary | None:
    """Log the summary line (and the warning when the run was too small to matter); returns the summary."""
    s = read_summary(output_dir)
    if s is None:
        return None
    logger.info("%s", summary_line(s))
    warning = too_small(s, lr=lr)
    if warning is not None:
        logger.warning("%s", warning)
    return s
