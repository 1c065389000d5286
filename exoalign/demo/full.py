"""``exoalign demo --full``: the powered experiment, several seeds and a verdict pooled over them.

Each seed is one :class:`~exoalign.demo.pipeline.Demo` whose small files (π_sft's training samples, every
finished run's evaluation with its samples, the stage markers, ``results.json``, ``frontier.png``,
``report.md``) go to ``RESULTS/full-seed{N}/`` and whose large ones (checkpoints, reference cache, logs) go to
``WORK/full-seed{N}/``. The results directory alone is enough to resume at the run level on another machine:
a run whose evaluation is there is not trained again, and the others train on the same samples of π_sft.

The pooled report (``RESULTS/full-pooled/``) compares the methods' frontiers by the mean over seeds of each
seed's frontier gap, with a paired bootstrap over held-out prompts stratified by seed
(:func:`~exoalign.demo.frontier.pooled_bootstrap`); "above"/"below" only when the interval excludes 0.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..fileio import atomic_write
from .frontier import envelope, pooled_bootstrap, verdict
from .report import load_points, power_lines

POOLED = (("exo-rw", "dpo-rw"), ("online-exo", "rloo"), ("online-exo", "ppo"), ("online-exo", "exo-rw"),
          ("online-exo", "online-dpo"))
"""The pooled comparisons (each when both methods ran): offline EXO vs DPO, online EXO vs the RL baselines,
online vs offline EXO, online EXO vs online DPO."""
TARGET_HALF_WIDTH = 0.03
"""The powered experiment's goal: a pooled 95% CI half-width of each frontier gap of at most this (VADER units)."""


def seed_dir(results: Path, seed: int) -> Path:
    return results / f"full-seed{seed}"


def run_full(results: Path, work: Path, seeds: Sequence[int], run_seed: Callable[[Path, Path, int], Any]) -> dict[str, Any]:
    """Every seed's demo, ``run_seed(out, work, seed)`` (which skips what is done), then the pooled report."""
    for seed in seeds:
        print(f"== --full: seed {seed} ({seed_dir(results, seed)})", file=sys.stderr)
        run_seed(seed_dir(results, seed), seed_dir(work, seed), seed)
    return pooled_report(results, seeds)


def seed_points(out: Path) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """One seed's results.json and, per method, its points with the per-prompt means (π_sft as step 0)."""
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    sft = load_points(out / "eval" / "sft.json")[0]
    points: dict[str, list[dict[str, Any]]] = {}
    for method, pts in results["runs"].items():
        for run in dict.fromkeys(p["run"] for p in pts):
            first = next(p for p in pts if p["run"] == run)
            beta = {"run": run, "beta_pi": first["beta_pi"], "beta_r": first["beta_r"]}
            points.setdefault(method, []).extend(
                [{**beta, **sft, "step": 0}] + [{**beta, **p} for p in load_points(out / "eval" / f"{run}.json")])
    return results, points


def _mean_points(per_seed: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """A method's checkpoints averaged over seeds, matched by (run, step); the reward interval combines the
    seeds' standard errors (each from its own 95% interval)."""
    out = []
    for p0 in per_seed[0]:
        same = [next((p for p in pts if p["run"] == p0["run"] and p["step"] == p0["step"]), None) for pts in per_seed]
        same = [p for p in same if p is not None]
        mean = lambda k, same=same: float(np.mean([p[k] for p in same]))  # noqa: E731
        se = float(np.sqrt(sum(((p["reward_ci"][1] - p["reward_ci"][0]) / 3.92) ** 2 for p in same))) / len(same)
        ppl = [p["sft_ppl"] for p in same if p.get("sft_ppl") is not None]
        out.append({"run": p0["run"], "beta_pi": p0["beta_pi"], "beta_r": p0["beta_r"], "step": p0["step"],
                    "kl": mean("kl"), "kl_k3": mean("kl_k3"), "reward": mean("reward"), "length": mean("length"),
                    "reward_ci": [mean("reward") - 1.96 * se, mean("reward") + 1.96 * se], "n_seeds": len(same),
                    "sft_ppl": float(np.mean(ppl)) if ppl else None})
    return out


def pooled_report(results: Path, seeds: Sequence[int], n_boot: int | None = None) -> dict[str, Any]:
    """``full-pooled/{results.json, frontier.png, report.md}`` from the seeds' directories."""
    loaded = [seed_points(seed_dir(results, s)) for s in seeds]
    first = loaded[0][0]
    n_boot = n_boot or first["settings"]["n_bootstrap"]
    methods = [m for m in loaded[0][1] if all(m in pts for _, pts in loaded)]
    comparison: dict[str, Any] = {}
    for a, b in POOLED:
        if a in methods and b in methods:
            comparison[f"{a}_vs_{b}"] = pooled_bootstrap([pts[a] for _, pts in loaded], [pts[b] for _, pts in loaded],
                                                         n_boot=n_boot, seed=0)
    per_seed = {str(s): {k: {x: r["comparison"][k][x] for x in ("mean_reward_gap", "ci", "side", "ci_half_width")
                             if x in r["comparison"][k]}
                         for k in comparison if k in r["comparison"]}
                for s, (r, _) in zip(seeds, loaded)}
    runs = {m: _mean_points([pts[m] for _, pts in loaded]) for m in methods}
    half = [c["ci_half_width"] for c in comparison.values()]
    pooled = {
        "seeds": list(seeds), "comparison": comparison, "verdict": verdict(comparison), "per_seed": per_seed,
        "power": {"target_ci_half_width": TARGET_HALF_WIDTH, "max_ci_half_width": max(half, default=None),
                  "met": bool(half) and max(half) <= TARGET_HALF_WIDTH
                  and all(c["kl_max"] > 0 for c in comparison.values())},
        "runs": runs, "frontiers": {m: dict(zip(("kl", "reward"), (v.tolist() for v in envelope(p))))
                                    for m, p in runs.items()},
        "quality": {m: {"sft_ppl_at_best": max(p, key=lambda q: q["reward"])["sft_ppl"],
                        "sft_ppl_sft": p[0]["sft_ppl"]} for m, p in runs.items()},
        "settings": first["settings"], "seed_seconds": {str(s): r.get("total_seconds") for s, (r, _) in
                                                         zip(seeds, loaded)},
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "created": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    out = results / "full-pooled"
    out.mkdir(parents=True, exist_ok=True)
    from .plot import plot

    plot(runs, out / "frontier.png",
         title=f"exoalign demo --full on {first['settings']['model_name']}: frontier, mean of seeds {list(seeds)}")
    atomic_write(out / "results.json", json.dumps(pooled, indent=1) + "\n")
    atomic_write(out / "report.md", markdown(pooled))
    return pooled


def markdown(p: dict[str, Any]) -> str:
    s = p["settings"]
    lines = [
        f"# exoalign demo --full — pooled over seeds {p['seeds']} ({s['model_name']})", "",
        f"Methods {', '.join(p['runs'])}; per seed the same {s['n_train_prompts']} training prompts, "
        f"{s['align_steps']} optimizer steps of {s['align_batch_size']} prompts × K = {s['k']} completions, "
        f"{s['n_eval_prompts']} held-out prompts × {s['eval_samples']} samples per checkpoint. The gap of two "
        "frontiers is the mean over seeds of each seed's mean reward gap at equal KL; its 95% interval comes from a "
        "paired bootstrap over held-out prompts stratified by seed.", "",
        "## Pooled verdict", "", *[f"* {line}" for line in p["verdict"].splitlines()], "",
        *power_lines(p["comparison"], TARGET_HALF_WIDTH),
        "![pooled reward–KL frontier](frontier.png)", "",
        "## Per seed", "", "| comparison | " + " | ".join(f"seed {s}" for s in p["seeds"]) + " | pooled |",
        "|---|" + "---|" * (len(p["seeds"]) + 1),
    ]
    for key, c in p["comparison"].items():
        cells = []
        for seed in p["seeds"]:
            d = p["per_seed"][str(seed)].get(key)
            cells.append("–" if d is None else f"{d['mean_reward_gap']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] "
                         f"{d['side']}")
        cells.append(f"**{c['mean_reward_gap']:+.3f} [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}] {c['side']}**")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += ["", "## Completion quality (π_sft's per-token perplexity of the samples, mean of seeds)", "",
              "| method | π_sft | at its highest-reward checkpoint |", "|---|---:|---:|"]
    for m, q in p["quality"].items():
        f = lambda v: "–" if v is None else f"{v:.1f}"  # noqa: E731
        lines.append(f"| {m} | {f(q['sft_ppl_sft'])} | {f(q['sft_ppl_at_best'])} |")
    lines += ["", f"Per-seed reports: {', '.join(f'[seed {s}](../full-seed{s}/report.md)' for s in p['seeds'])}.", ""]
    return "\n".join(lines)
