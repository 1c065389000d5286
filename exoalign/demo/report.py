"""The demo's report: ``results.json``, the frontier PNG and ``report.md``, and the EXO-vs-DPO verdict.

"EXO's frontier lies above DPO's" is measured, not eyeballed: each run's frontier is the upper envelope of its
checkpoints in the (KL, reward) plane — the most reward reached at no more than a given KL — interpolated
linearly between envelope points. Two runs are compared on the KL range both cover (from 0, where both start at
π_sft, to the smaller of their largest KLs): the mean difference of their envelopes over that range, and the
share of the range where EXO's is higher. That is "higher reward at equal KL", averaged over the KL budgets
both runs reached.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .jobs import usable_cores

if TYPE_CHECKING:
    from .pipeline import Demo

COMPARISONS = (("exo-pref", "dpo-pref"), ("exo-rw", "dpo-rw"))
"""EXO against DPO with the same targets on the same data."""


def load_points(eval_json: Path) -> list[dict[str, Any]]:
    """A run's checkpoints from its eval JSON as ``{"step", "kl", "reward", …}`` in step order (π_sft = 0)."""
    data = json.loads(eval_json.read_text(encoding="utf-8"))
    points = []
    for r in data["results"]:
        m = re.search(r"checkpoint-(\d+)$", r["checkpoint"].rstrip("/"))
        step = int(m.group(1)) if m else 0  # the only non-checkpoint is π_sft itself, the start of every run
        wr = r.get("win_rate") or {}
        points.append({
            "step": step, "kl": float(r["kl"]), "reward": float(r["reward"]["mean"]),
            "reward_ci": [float(r["reward"]["ci_low"]), float(r["reward"]["ci_high"])],
            "kl_se": float(r["kl_se"]), "kl_k3": float(r["kl_k3"]),
            "win_rate": float(wr["mean"]) if "mean" in wr else None,
            "length": float(r["length"]),
        })
    return sorted(points, key=lambda p: p["step"])


def envelope(points: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Upper-left envelope ``(kl, reward)``: the points no other point beats with less KL and more reward.

    KL estimates of checkpoints near π_sft can come out slightly negative (sampling noise); they are clipped
    to 0 so every frontier starts on the reward axis.
    """
    pts = sorted((max(p["kl"], 0.0), p["reward"]) for p in points)
    xs, ys = [], []
    for x, y in pts:
        if not ys or y > ys[-1]:
            xs.append(x)
            ys.append(y)
    return np.asarray(xs), np.asarray(ys)


def reward_at(env: tuple[np.ndarray, np.ndarray], kl: np.ndarray) -> np.ndarray:
    """Best reward of the envelope within each KL budget, linear between envelope points."""
    xs, ys = env
    if len(xs) == 1:
        return np.full_like(kl, ys[0], dtype=np.float64)
    return np.interp(kl, xs, ys)  # constant beyond the ends: no extrapolation beyond what was reached


def compare(a: list[dict[str, Any]], b: list[dict[str, Any]], n_grid: int = 201) -> dict[str, float]:
    """Frontier of ``a`` minus frontier of ``b`` over the KL range both reached."""
    ea, eb = envelope(a), envelope(b)
    # The range both runs explored, whether or not their late checkpoints improved the reward.
    kl_max = max(0.0, float(min(max(p["kl"] for p in a), max(p["kl"] for p in b))))
    grid = np.linspace(0.0, kl_max, n_grid)
    diff = reward_at(ea, grid) - reward_at(eb, grid)
    halfwidths = [(p["reward_ci"][1] - p["reward_ci"][0]) / 2 for p in a + b if "reward_ci" in p]
    return {"kl_max": kl_max, "mean_reward_gap": float(diff.mean()), "frac_above": float((diff > 0).mean()),
            "reward_a_at_kl_max": float(reward_at(ea, grid[-1:])[0]),
            "reward_b_at_kl_max": float(reward_at(eb, grid[-1:])[0]),
            "point_ci_halfwidth": float(np.mean(halfwidths)) if halfwidths else float("nan")}


LEVEL = 0.005
"""A mean gap smaller than this (0.25% of the reward range [-1, 1]) is reported as level."""


def verdict(comparison: dict[str, dict[str, float]]) -> str:
    """One sentence per comparison, stating plainly which frontier is higher and by how much."""
    lines = []
    for key, c in comparison.items():
        a, b = key.split("_vs_")
        if c["kl_max"] <= 0:
            lines.append(f"{a} vs {b}: no common KL range (a run did not move from π_sft); no verdict.")
            continue
        gap = c["mean_reward_gap"]
        side = "LEVEL WITH" if abs(gap) < LEVEL else "ABOVE" if gap > 0 else "BELOW"
        ci = c.get("point_ci_halfwidth", float("nan"))
        noise = f"; a single point's 95% CI is ±{ci:.3f}" if math.isfinite(ci) else ""
        lines.append(
            f"{a} vs {b}: {a}'s frontier lies {side} {b}'s — mean reward gap {gap:+.3f} at equal KL over "
            f"KL in [0, {c['kl_max']:.2f}] nats, higher on {100 * c['frac_above']:.0f}% of that range "
            f"(at KL {c['kl_max']:.2f}: {c['reward_a_at_kl_max']:.3f} vs {c['reward_b_at_kl_max']:.3f}{noise})."
        )
    return "\n".join(lines)


def _versions() -> dict[str, str]:
    import torch
    import transformers

    from .. import __version__

    return {"exoalign": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "platform": platform.platform()}


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_report(demo: Demo, names: list[str]) -> dict[str, Any]:
    """Write ``frontier.png`` (+ ``frontier.md``), ``results.json`` and ``report.md`` into the demo directory."""
    from ..eval.plots import frontier

    out = demo.out
    sft = json.loads((demo.evals / "sft.json").read_text(encoding="utf-8"))
    paths = []
    for n in names:
        # Every run starts at π_sft: its eval JSON, with π_sft's result put first, is the run's line.
        data = json.loads((demo.evals / f"{n}.json").read_text(encoding="utf-8"))
        start = [{**r, "run": n, "step": 0} for r in sft["results"]]
        data["results"] = start + [{**r, "run": n} for r in data["results"]]
        paths.append(demo.evals / "with_sft" / f"{n}.json")
        paths[-1].parent.mkdir(parents=True, exist_ok=True)
        _write(paths[-1], json.dumps(data, indent=1))
    runs = {n: load_points(p) for n, p in zip(names, paths)}
    frontier([str(p) for p in paths], str(out / "frontier.png"), table_path=str(out / "frontier.md"),
             labels=names, title=f"exoalign demo: reward–KL frontier (seed {demo.s.seed})")
    comparison = {f"{a}_vs_{b}": compare(runs[a], runs[b]) for a, b in COMPARISONS if a in runs and b in runs}
    text = verdict(comparison)
    results = {
        "runs": runs, "comparison": comparison, "verdict": text, "seed": demo.s.seed, "device": demo.device,
        "settings": dataclasses.asdict(demo.s), "timings": demo.timings, "versions": _versions(),
        "total_seconds": time.perf_counter() - demo.started, "cores": usable_cores(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "command": "exoalign demo " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["demo"] else sys.argv[1:]),
    }
    _write(out / "results.json", json.dumps(results, indent=1) + "\n")
    _write(out / "report.md", markdown(results))
    return results


def checkpoint_table(runs: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown rows of every checkpoint of every run (step 0 = π_sft)."""
    lines = ["| run | step | KL(π‖π_sft) | KL (k3) | reward | reward 95% CI | tokens |", "|---|---:|---:|---:|---:|---|---:|"]
    for name, points in runs.items():
        for p in points:
            lo, hi = p["reward_ci"]
            lines.append(f"| {name} | {p['step']} | {p['kl']:.3f} | {p['kl_k3']:.3f} | {p['reward']:.3f} | "
                         f"[{lo:.3f}, {hi:.3f}] | {p['length']:.1f} |")
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    """``report.md``: the verdict, the picture, every checkpoint's numbers, the settings and the timings."""
    s = results["settings"]
    lines = [
        f"# exoalign demo — EXO vs DPO on controlled sentiment generation (seed {results['seed']})", "",
        f"Command: `{results['command'].strip()}` on {results['device']}.", "",
        "Task: continue the first words of a synthetic movie review so that it reads positive; reward = VADER "
        "sentiment of the completion (in [-1, 1]); every method starts from the same π_sft and trains on the "
        "same prompts and completions for the same number of steps. Each point is a checkpoint (step 0 = π_sft) "
        f"evaluated on {s['n_eval_prompts']} held-out prompts × {s['eval_samples']} samples.", "",
        "## Verdict (higher reward at equal KL)", "",
        *[f"* {line}" for line in results["verdict"].splitlines()], "",
        "![reward–KL frontier](frontier.png)", "",
        "## Every checkpoint", "", checkpoint_table(results["runs"]), "",
        "## Settings", "", "| setting | value |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in s.items()], "",
        "## Timings", "",
        f"Wall-clock and CPU seconds per stage on {results['cores']} usable core(s); the load average (other "
        f"processes on the machine) was {results['load_average']} at the end. Trainings and evaluations run "
        "side by side, one core each, so their wall times overlap.", "",
        "| stage | wall s | CPU s | |", "|---|---:|---:|---|",
    ]
    for stage, t in results["timings"].items():
        cpu = t.get("cpu_seconds")
        lines.append(f"| {stage} | {t['seconds']:.1f} | {'–' if cpu is None else f'{cpu:.1f}'} | "
                     f"{'cached (times of the run that made it)' if t.get('cached') else ''} |")
    lines.append(f"| **total of this invocation** | {results['total_seconds']:.1f} | | |")
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()), ""]
    return "\n".join(lines)


def _label(results: dict[str, Any]) -> str:
    """``seed N`` plus the settings that differ from the default preset (``k=8``), to tell runs apart."""
    from .settings import DemoSettings

    default = dataclasses.asdict(DemoSettings())
    changed = [f"{k}={v}" for k, v in results["settings"].items() if k != "seed" and default.get(k) != v]
    return " ".join([f"seed {results['seed']}", *changed])


def seed_summary(paths: list[str]) -> str:
    """Markdown table of the EXO-vs-DPO comparisons of several demo runs (e.g. seeds), with their mean."""
    rows = ["| run | comparison | KL range (nats) | mean reward gap | EXO higher on | verdict |",
            "|---|---|---:|---:|---:|---|"]
    gaps: dict[str, list[float]] = {}
    for path in paths:
        results = json.loads(Path(path).read_text(encoding="utf-8"))
        for key, c in results["comparison"].items():
            line = verdict({key: c})
            side = "level" if "LEVEL WITH" in line else "above" if "ABOVE" in line else "below"
            rows.append(f"| {_label(results)} | {key.replace('_vs_', ' vs ')} | 0–{c['kl_max']:.2f} | "
                        f"{c['mean_reward_gap']:+.3f} | {100 * c['frac_above']:.0f}% | EXO {side} |")
            gaps.setdefault(key, []).append(c["mean_reward_gap"])
    for key, g in gaps.items():
        rows.append(f"| mean of {len(g)} | {key.replace('_vs_', ' vs ')} | | {float(np.mean(g)):+.3f} | | |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # python -m exoalign.demo.report DIR1/results.json DIR2/results.json …
    print(seed_summary(sys.argv[1:]), end="")
