"""The demo's report: ``results.json``, ``frontier.png`` + ``frontier.md`` and ``report.md`` with the verdict.

Each point is one checkpoint evaluated on the held-out prompts (step 0 of every run is π_sft itself); a
method's frontier is the envelope of its points over every β_π (:mod:`exoalign.demo.frontier`), and EXO is
compared with DPO by a paired bootstrap over the prompts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..fileio import atomic_write
from .frontier import envelope, paired_bootstrap, verdict
from .jobs import usable_cores
from .settings import ONLINE_METHODS, fmt_beta


class Demo(Protocol):
    """What the report reads of a demo run (``pipeline.Demo`` has it); a protocol, so report does not import
    pipeline, which imports report."""

    out: Path
    data: Path
    evals: Path
    s: Any
    device: str
    timings: dict[str, Any]
    started: float

COMPARISONS = (("exo-pref", "dpo-pref"), ("exo-rw", "dpo-rw"), ("online-exo", "rloo"), ("online-exo", "ppo"),
               ("online-exo", "online-dpo"), ("online-exo", "exo-rw"))
"""EXO against DPO with the same targets on the same samples; online EXO against the RL baselines, online DPO
and offline EXO (each when both ran)."""
DEFINITIONS = (
    "**KL** is `KL(π‖π_sft)` in nats per completion, estimated on the policy's own samples y ~ π: "
    "**k1** = mean of `log π(y) − log π_sft(y)` (unbiased; the authors' estimator, the x axis) and "
    "**k3** = mean of `ρ − 1 − log ρ` with `ρ = π_sft(y)/π(y)` (never negative, lower variance). "
    "Log-probs are sums over the completion's tokens at the sampling temperature. **tokens** = the mean "
    "number of generated tokens per completion (EOS included when it was sampled; at most max_new_tokens). "
    "**reward** = VADER compound sentiment of the completion, in [-1, 1]. "
    "**π_sft ppl** = π_sft's per-token perplexity of the policy's samples, exp(−Σ log π_sft(y) / Σ tokens): "
    "π_sft is a fluent model, so text it finds improbable (gibberish, repeated tokens, broken words) raises it; "
    "at π_sft it is π_sft's own perplexity at the sampling temperature. A reward bought with degenerate text "
    "shows as a rising π_sft ppl beside the KL."
)


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "model"


def load_points(eval_json: Path) -> list[dict[str, Any]]:
    """Checkpoints of one eval JSON, each with its per-prompt means (from the saved samples) and examples."""
    data = json.loads(eval_json.read_text(encoding="utf-8"))
    samples_dir = eval_json.with_name(eval_json.stem + ".samples")
    points = []
    for r in data["results"]:
        m = re.search(r"checkpoint-(\d+)$", r["checkpoint"].rstrip("/"))
        rows = [json.loads(line) for line in
                (samples_dir / f"{_safe(r['name'])}.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
        lp = np.asarray([row["logps"] for row in rows], dtype=np.float64)  # (n_prompts, samples)
        ref = np.asarray([row["ref_logps"] for row in rows], dtype=np.float64)  # (n_prompts, samples)
        tokens = np.asarray([row["lengths"] for row in rows], dtype=np.float64) if "lengths" in rows[0] else None
        points.append({
            "step": int(m.group(1)) if m else 0, "kl": float(r["kl"]), "kl_se": float(r["kl_se"]),
            "kl_k3": float(r["kl_k3"]), "reward": float(r["reward"]["mean"]),
            "reward_ci": [float(r["reward"]["ci_low"]), float(r["reward"]["ci_high"])],
            "length": float(r["length"]), "finished": float(r.get("finished", float("nan"))),
            "prompt_reward": [float(np.mean(row["rewards"])) for row in rows],
            "prompt_kl": (lp - ref).mean(1).tolist(),
            # π_sft's per-token perplexity of these samples (null for evaluations made before lengths were kept)
            "sft_ppl": float(np.exp(-ref.sum() / max(tokens.sum(), 1.0))) if tokens is not None else None,
            "examples": [row["completions"][0] for row in rows[:3]],
        })
    return sorted(points, key=lambda p: p["step"])


def collect(demo: Demo, runs: list[tuple[str, str, float]]) -> dict[str, list[dict[str, Any]]]:
    """Per method, the points of all its runs (π_sft as step 0 of each), with ``beta_pi`` and ``beta_r``."""
    sft = load_points(demo.evals / "sft.json")[0]
    out: dict[str, list[dict[str, Any]]] = {}
    for name, method, beta_pi in runs:
        beta = {"run": name, "beta_pi": beta_pi, "beta_r": demo.s.beta_r}
        pts = [{**beta, **sft, "step": 0}] + [{**beta, **p} for p in load_points(demo.evals / f"{name}.json")]
        out.setdefault(method, []).extend(pts)
    return out


def _versions() -> dict[str, str]:
    import torch
    import transformers

    from .. import __version__

    return {"exoalign": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "platform": platform.platform()}


PER_PROMPT = ("prompt_reward", "prompt_kl", "examples")


def write_report(demo: Demo, runs: list[tuple[str, str, float]]) -> dict[str, Any]:
    """Write ``frontier.png`` (+ ``frontier.md``), ``results.json`` and ``report.md`` into the demo directory."""
    out, s = demo.out, demo.s
    points = collect(demo, runs)
    comparison: dict[str, Any] = {}
    for a, b in COMPARISONS:
        if a not in points or b not in points:
            continue
        comparison[f"{a}_vs_{b}"] = {**paired_bootstrap(points[a], points[b], n_boot=s.n_bootstrap, seed=s.seed),
                                     "beta_pi": "envelope"}
        for beta in s.beta_pi:  # the same comparison at each β_π alone
            pa = [p for p in points[a] if p["beta_pi"] == beta]
            pb = [p for p in points[b] if p["beta_pi"] == beta]
            if not pa or not pb or len(s.beta_pi) < 2 or a in ONLINE_METHODS:  # online runs use one β_π
                continue
            comparison[f"{a}@{fmt_beta(beta)}_vs_{b}@{fmt_beta(beta)}"] = {
                **paired_bootstrap(pa, pb, n_boot=s.n_bootstrap, seed=s.seed), "beta_pi": beta}
    model = json.loads((demo.data / "model.json").read_text(encoding="utf-8"))
    settings = {**dataclasses.asdict(s), "model_name": model["name"], "model_parameters": model["parameters"],
                "model_type": model["model_type"]}
    examples = _examples(demo, points)
    public = {m: [{k: v for k, v in p.items() if k not in PER_PROMPT} for p in pts] for m, pts in points.items()}
    results = {
        "runs": public, "frontiers": {m: dict(zip(("kl", "reward"), (v.tolist() for v in envelope(pts))))
                                         for m, pts in points.items()},
        "comparison": comparison, "verdict": verdict(comparison), "quality": quality(points), "seed": s.seed,
        "device": demo.device,
        "settings": settings, "examples": examples, "definitions": DEFINITIONS,
        "timings": demo.timings, "versions": _versions(),
        "total_seconds": time.perf_counter() - demo.started, "stage_seconds": dict(demo.stage_walls),
        "cores": usable_cores(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "command": "exoalign demo " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["demo"] else sys.argv[1:]),
    }
    from .plot import plot

    plot(points, out / "frontier.png", title=f"exoalign demo on {model['name']}: reward–KL frontier (seed {s.seed})")
    atomic_write(out / "frontier.md", checkpoint_table(public) + "\n")
    atomic_write(out / "results.json", json.dumps(results, indent=1) + "\n")
    atomic_write(out / "report.md", markdown(results))
    return results


def quality(points: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The completion-quality check beside reward and KL: π_sft's per-token perplexity of π_sft's own samples
    and of each method's highest-reward checkpoint's."""
    any_pts = next(iter(points.values()))
    out: dict[str, Any] = {"sft": {"sft_ppl": any_pts[0].get("sft_ppl"), "reward": any_pts[0]["reward"]}}
    for method, pts in points.items():
        best = max((p for p in pts if p["step"] > 0), key=lambda p: p["reward"], default=pts[0])
        out[method] = {k: best.get(k) for k in ("run", "step", "kl", "reward", "sft_ppl")}
    return out


def quality_lines(q: dict[str, Any]) -> list[str]:
    def ppl(v: Any) -> str:
        return "–" if v is None else f"{v:.1f}"

    lines = ["**Completion quality** (π_sft's per-token perplexity of the samples; see the definitions): π_sft "
             f"{ppl(q['sft']['sft_ppl'])}"]
    lines += [f"; {m} at its best reward (step {v['step']}, KL {v['kl']:.2f}, reward {v['reward']:.3f}) "
              f"{ppl(v['sft_ppl'])}" for m, v in q.items() if m != "sft"]
    return ["".join(lines) + ".", ""]


def _opening(row: dict[str, Any], instruction: str) -> str:
    if "messages" in row:
        return row["messages"][-1]["content"].removeprefix(instruction)
    return row["prompt"]


def _examples(demo: Demo, points: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The first three held-out prompts with π_sft's completion and each method's best checkpoint's."""
    rows = [json.loads(line) for line in (demo.data / "eval_prompts.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()][:3]
    any_pts = next(iter(points.values()))
    ex: dict[str, Any] = {"prompts": [_opening(r, demo.s.instruction) for r in rows],
                          "sft": {"reward": any_pts[0]["reward"], "completions": any_pts[0]["examples"]}}
    for method, pts in points.items():
        best = max((p for p in pts if p["step"] > 0), key=lambda p: p["reward"], default=pts[0])
        ex[method] = {"run": best["run"], "step": best["step"], "beta_pi": best["beta_pi"], "kl": best["kl"],
                      "reward": best["reward"], "completions": best["examples"]}
    return ex


def checkpoint_table(runs: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown rows of every checkpoint of every run (step 0 = π_sft)."""
    lines = ["| method | β_π | β_r | step | KL k1 (nats) | KL k3 (nats) | reward | reward 95% CI | tokens | π_sft ppl |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for name, points in runs.items():
        for p in points:
            lo, hi = p["reward_ci"]
            ppl = "–" if p.get("sft_ppl") is None else f"{p['sft_ppl']:.1f}"
            lines.append(f"| {name} | {fmt_beta(p['beta_pi'])} | {fmt_beta(p['beta_r'])} | {p['step']} | {p['kl']:.3f} | "
                         f"{p['kl_k3']:.3f} | {p['reward']:.3f} | [{lo:.3f}, {hi:.3f}] | {p['length']:.1f} | {ppl} |")
    return "\n".join(lines)


def _quote(text: str, n: int = 160) -> str:
    text = " ".join(text.split())
    return (text[:n] + "…" if len(text) > n else text).replace("|", "\\|")


def _online_sentence(s: dict[str, Any]) -> str:
    online = [m for m in s["methods"] if m in ONLINE_METHODS]
    if not online:
        return ""
    reuse = s.get("online_reuse", 1)
    return (f"; online methods ({', '.join(online)}, β_π = {s['online_beta_pi']}) sample K = {s['k']} completions "
            f"of {s['align_batch_size']} prompts from the current policy in each of {s['online_rounds']} rounds and "
            f"take {s['online_steps_per_round']} step(s) per round, each sample used {reuse} time(s)")


def power_lines(comparison: dict[str, dict[str, Any]], target: float | None = None) -> list[str]:
    """The power reached: each comparison's interval half-width and its 80%-power detectable gap."""
    if not comparison:
        return []
    lines = ["**Power reached** (95% CI half-width of the gap; the smallest true gap detected with 80% "
             "probability, 2.8 bootstrap standard errors" + (f"; target half-width ≤ {target}" if target else "")
             + "):", ""]
    for key, c in comparison.items():
        if "ci_half_width" in c:
            ok = "" if target is None else (" ✓" if c["ci_half_width"] <= target else " ✗ (above target)")
            lines.append(f"* {key}: ±{c['ci_half_width']:.3f}, detectable gap {c['mde80']:.3f}{ok}")
    return [*lines, ""]


def markdown(results: dict[str, Any]) -> str:
    """``report.md``: the verdict, the picture, examples, every checkpoint, the settings and the timings."""
    s, ex = results["settings"], results["examples"]
    model = f"{s['model_name']} ({s['model_parameters'] / 1e6:.1f}M parameters)"
    lines = [
        f"# exoalign demo — EXO vs DPO on controlled sentiment generation, {s['model_name']} (seed {results['seed']})",
        "", f"Command: `{results['command'].strip()}` on {results['device']}.", "",
        f"Task: π_sft = {model} continues the opening of a movie review "
        f"({'inside the chat template after ' + repr(s['instruction']) if s['prompt_format'] == 'chat' and s['model'] != 'scratch' else 'as raw text'}); "
        "reward = VADER sentiment of the completion. Every method starts from π_sft. Offline methods train on the "
        f"same {s['n_train_prompts']} prompts × K = {s['k']} samples of π_sft for {s['align_steps']} steps of "
        f"{s['align_batch_size']} prompts, once per β_π in {s['beta_pi']} (β_r = {s['beta_r']} for rw targets; "
        f"pref targets use ε = {s['eps']} instead)" + _online_sentence(s) + ". "
        f"Each point is a checkpoint (step 0 = π_sft) evaluated on {s['n_eval_prompts']} held-out prompts × "
        f"{s['eval_samples']} samples, with the same prompts and random streams for every checkpoint. A method's "
        "frontier is the envelope of its checkpoints over all β_π.", "",
        "## Verdict (higher reward at equal KL; paired bootstrap over held-out prompts)", "",
        *[f"* {line}" for line in results["verdict"].splitlines()], "",
        *power_lines(results["comparison"]),
        *quality_lines(results["quality"]),
        "![reward–KL frontier](frontier.png)", "", DEFINITIONS, "",
        "## Example completions (the first three held-out prompts; first sample)", "",
        "| prompt | " + " | ".join(ex["prompts"]).replace("\n", " ") + " |",
        "|---|" + "---|" * len(ex["prompts"]),
        f"| π_sft (reward {ex['sft']['reward']:.3f}) | " + " | ".join(_quote(c) for c in ex["sft"]["completions"]) + " |",
    ]
    for method, e in ex.items():
        if method in ("prompts", "sft"):
            continue
        lines.append(f"| {method} best: β_π={fmt_beta(e['beta_pi'])} step {e['step']} (reward {e['reward']:.3f}, "
                     f"KL {e['kl']:.2f}) | " + " | ".join(_quote(c) for c in e["completions"]) + " |")
    lines += ["", "## Every checkpoint", "", checkpoint_table(results["runs"]), "",
              "## Settings", "", "| setting | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in s.items()], "",
              "## Timings", "",
              f"Wall-clock and CPU seconds per stage on {results['cores']} usable core(s); the load average (other "
              f"processes on the machine) was {results['load_average']} at the end. Trainings and evaluations run "
              "side by side, one core each, so their wall times overlap.", "",
              "| stage | wall s | CPU s | |", "|---|---:|---:|---|"]
    for stage, t in results["timings"].items():
        cpu = t.get("cpu_seconds")
        lines.append(f"| {stage} | {t['seconds']:.1f} | {'–' if cpu is None else f'{cpu:.1f}'} | "
                     f"{'cached (times of the run that made it)' if t.get('cached') else ''} |")
    for what, took in (results.get("stage_seconds") or {}).items():
        lines.append(f"| **{what} (the pool's wall time)** | {took:.1f} | | |")
    lines.append(f"| **total of this invocation** | {results['total_seconds']:.1f} | | |")
    lines += overheads_table(results["timings"])
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()), ""]
    return "\n".join(lines)


def _s(x: Any) -> str:
    return "–" if x is None else f"{x:.2f}"


def overheads_table(timings: dict[str, Any]) -> list[str]:
    """Markdown lines: each job's start-up overheads (``Demo.overheads``), so the cost outside the steps is seen."""
    jobs = {name: t["overheads"] for name, t in timings.items() if t.get("overheads")}
    if not jobs:
        return []
    lines = ["", "Start-up per job (seconds): the worker process's start (its first job only), set-up (accelerator, "
             "tokeniser, rows; an evaluation's prompts, judge and π_sft), the model's load, the reference log-probs, "
             "the first optimizer step; for an evaluation, generation and total per checkpoint.", "",
             "| job | process start | set-up | load | reference | first step | eval: generation / total per checkpoint |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for name, o in jobs.items():
        ck = " · ".join(f"{_s(c.get('generation_s'))} / {_s(c.get('total_s'))}" for c in (o.get("checkpoints") or {}).values())
        lines.append(f"| {name} | {_s(o.get('process_start_s'))} | {_s(o.get('setup_s'))} | {_s(o.get('load_s'))} | "
                     f"{_s(o.get('reference_s'))} | {_s(o.get('first_step_s'))} | {ck} |")
    return lines


def seed_summary(paths: list[str]) -> str:
    """Markdown table of the EXO-vs-DPO comparisons of several demo runs (e.g. seeds)."""
    rows = ["| run | comparison | β_π | KL range (nats) | mean reward gap | 95% paired CI | verdict |",
            "|---|---|---|---:|---:|---|---|"]
    for path in paths:
        results = json.loads(Path(path).read_text(encoding="utf-8"))
        label = f"{results['settings'].get('model_name', '?')} seed {results['seed']}"
        for key, c in results["comparison"].items():
            a, b = (x.split("@")[0] for x in key.split("_vs_"))
            beta = c.get("beta_pi", "envelope")
            rows.append(f"| {label} | {a} vs {b} | {beta if beta == 'envelope' else fmt_beta(beta)} | "
                        f"0–{c['kl_max']:.2f} | {c['mean_reward_gap']:+.3f} | [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}] | "
                        f"EXO {c['side']} |".replace("EXO no difference", "no difference"))
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # python -m exoalign.demo.report DIR1/results.json DIR2/results.json …
    print(seed_summary(sys.argv[1:]), end="")
