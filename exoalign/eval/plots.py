"""``exoalign plot frontier``: the reward–KL frontier of several runs in one PNG, plus a Markdown table.

    exoalign plot frontier results/exo.json results/dpo.json --output results/frontier.png [--table t.md]

Each argument is an eval JSON (``exoalign eval``; schema ``exoalign.eval/1``), or a training run's
``output_dir/eval.jsonl`` (one such JSON per line, written while it trained; the lines are merged). Its
results are grouped into runs by their ``run`` field (the training output_dir they came from); a JSON holding one run is labelled by
its own ``run`` name (or ``--labels``). Every checkpoint becomes a point at ``(KL(π_θ‖π_sft), mean reward)``
with the reward's confidence interval as an error bar; a run's points are joined in step order, one colour
per run — the paper's IMDB figure (reward against KL for every checkpoint of EXO and DPO).

* π_sft is not a run: it is the step-0 point of every run (KL 0 by definition). It is the result whose
  checkpoint is the eval's ``sft_model`` (from any of the files, when they share that model), else the eval's
  baseline when the baseline is π_sft (its reward from the baseline's own samples).
* ``final`` is drawn once: when a run's ``final`` has the step of one of its checkpoints (the same weights),
  only the checkpoint is drawn and its table row says ``(= final)``.
* The axes carry units: KL in nats (which estimator), the reward named by its judge (oracle or reward model).

``--kl kl_k3`` plots the k3 estimate instead of the authors' ``kl``. The table (``<output stem>.md`` unless
``--table``) lists π_sft once and then every point of every run, with both KL estimates, the reward and the
win rate.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..config import ArgumentParser
from ..errors import InputError
from ..fileio import atomic_savefig, atomic_write

SCHEMA = "exoalign.eval/1"
SFT_LABEL = "π_sft"
Run = tuple[str, dict[str, Any]]
"""``(label, {"results": [result, …]})``: one line of the plot; π_sft's point (``"sft": True``) comes first."""


def load_eval(path: str) -> dict[str, Any]:
    """Read and check one eval JSON; InputError naming the file and the missing field otherwise."""
    p = Path(path)
    if not p.is_file():
        raise InputError("no such eval JSON", file=path, fix="give files written by exoalign eval")
    try:
        data = _merge_lines(p) if p.suffix == ".jsonl" else json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"not JSON ({str(e).splitlines()[0]})", file=path, fix="give files written by exoalign eval") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise InputError(f"not an eval JSON (schema is not {SCHEMA!r})", file=path, field="schema",
                         fix="give files written by exoalign eval")
    results = data.get("results")
    if not isinstance(results, list) or not results:
        raise InputError("holds no evaluated checkpoints", file=path, field="results",
                         fix="run exoalign eval to completion first")
    for i, r in enumerate(results):
        _check_result(r, path, i)
    return data


def _merge_lines(p: Path) -> dict[str, Any]:
    """A ``.jsonl`` of eval JSONs (``output_dir/eval.jsonl``, one point per line, written while training) as one
    eval JSON: the first line's header and every line's results. A line torn by a kill is skipped."""
    lines = []
    for line in p.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    if not lines or not all(isinstance(x, dict) for x in lines):
        return {}
    return {**lines[0], "results": [r for x in lines for r in (x.get("results") or [])]}


def _number(value: Any, *, finite: bool) -> bool:
    """A real number (not a bool); with ``finite`` neither NaN nor infinite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value) or not finite


def _check_result(r: Any, path: str, i: int) -> None:
    """One entry of ``results``: the fields the plot and the table read, with the right types."""
    fix = "regenerate the file with exoalign eval"
    if not isinstance(r, dict):
        raise InputError("must be an object", file=path, field=f"results[{i}]", fix=fix)
    for key in ("name", "kl", "kl_k3", "reward"):
        if key not in r:
            raise InputError("missing", file=path, field=f"results[{i}].{key}", fix=fix)
    if not isinstance(r["name"], str):
        raise InputError("must be a string", file=path, field=f"results[{i}].name", fix=fix)
    for key in ("kl", "kl_k3"):
        if not _number(r[key], finite=True):
            raise InputError(f"must be a finite number (got {r[key]!r})", file=path, field=f"results[{i}].{key}", fix=fix)
    reward = r["reward"]
    if not isinstance(reward, dict) or not _number(reward.get("mean"), finite=True):
        raise InputError("must be an object with a finite 'mean'", file=path, field=f"results[{i}].reward", fix=fix)
    for key in ("ci_low", "ci_high"):  # a CI may be NaN (one prompt); it is then drawn without a bar
        if key in reward and not _number(reward[key], finite=False):
            raise InputError("must be a number", file=path, field=f"results[{i}].reward.{key}", fix=fix)
    step = r.get("step")
    if step is not None and not _number(step, finite=True):
        raise InputError("must be a number or null", file=path, field=f"results[{i}].step", fix=fix)
    if r.get("run") is not None and not isinstance(r["run"], str):
        raise InputError("must be a string or null", file=path, field=f"results[{i}].run", fix=fix)
    wr = r.get("win_rate")
    if wr is not None and (not isinstance(wr, dict)
                           or not all(_number(wr.get(k), finite=False) for k in ("mean", "ci_low", "ci_high"))):
        raise InputError("must be null or an object with numbers mean, ci_low, ci_high", file=path,
                         field=f"results[{i}].win_rate", fix=fix)


# ------------------------------------------------------------------------------------------- runs
def _norm(path: Any) -> str | None:
    return os.path.normpath(str(path)) if isinstance(path, str) and path else None


def sft_model(data: dict[str, Any]) -> str | None:
    """The π_sft the file's KLs are measured against (``settings.sft_model``), normalised; None if unknown."""
    return _norm((data.get("settings") or {}).get("sft_model"))


def _is_sft(r: dict[str, Any], sft: str | None) -> bool:
    return sft is not None and _norm(r.get("checkpoint")) == sft


def sft_point(data: dict[str, Any]) -> dict[str, Any] | None:
    """π_sft's point in this file: its own result (same sampling seeds as the checkpoints), else the baseline
    when the baseline is π_sft (KL 0 exactly), else None."""
    sft = sft_model(data)
    for r in data["results"]:
        if _is_sft(r, sft):
            return {**r, "step": 0, "sft": True}
    base = data.get("baseline")
    if sft is not None and isinstance(base, dict) and _norm(base.get("model")) == sft:
        reward = base.get("reward")
        if isinstance(reward, dict) and _number(reward.get("mean"), finite=True):
            return {"checkpoint": base["model"], "name": f"{SFT_LABEL} (baseline samples)", "step": 0, "kl": 0.0,
                    "kl_k3": 0.0, "reward": reward, "win_rate": None, "sft": True}
    return None


def _order(r: dict[str, Any]) -> tuple[float, str]:
    step = r.get("step")
    return (float(step) if isinstance(step, (int, float)) else math.inf, r["name"])


def _is_final(r: dict[str, Any]) -> bool:
    return r["name"].rstrip("/").endswith("final") and os.path.basename(str(r.get("checkpoint", "")).rstrip("/")) == "final"


def dedupe_final(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``results`` in step order, without a ``final`` whose step equals a checkpoint's (the same weights): that
    checkpoint is marked ``"final": True`` instead."""
    rs = sorted(results, key=_order)
    steps = {r.get("step") for r in rs if not _is_final(r) and r.get("step") is not None}
    out = []
    for r in rs:
        if _is_final(r) and r.get("step") is not None and r["step"] in steps:
            continue
        out.append(r)
    finals = {r["step"] for r in rs if _is_final(r) and r.get("step") in steps}
    return [{**r, "final": True} if not _is_final(r) and r.get("step") in finals else r for r in out]


def group_runs(data: dict[str, Any], label: str, start: dict[str, Any] | None = None) -> list[Run]:
    """Split one eval JSON into runs (its results' ``run`` field), π_sft taken out and put first in each run
    (``start``: π_sft's point from another file when this one has none)."""
    sft = sft_model(data)
    start = sft_point(data) or start
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in data["results"]:
        if not _is_sft(r, sft):
            groups.setdefault(str(r.get("run") or label), []).append(r)
    if len(groups) == 1:
        groups = {label: next(iter(groups.values()))}
    return [(name, {"results": ([start] if start else []) + dedupe_final(rs)}) for name, rs in groups.items()]


def _sft_points(runs: list[Run]) -> list[dict[str, Any]]:
    """The distinct π_sft points of ``runs`` (one when all runs share the same evaluation of π_sft)."""
    seen: dict[tuple, dict[str, Any]] = {}
    for _, data in runs:
        for r in data["results"]:
            if r.get("sft"):
                seen.setdefault((_norm(r.get("checkpoint")), r["reward"]["mean"], r["kl"]), r)
    return list(seen.values())


# ------------------------------------------------------------------------------------------ table
def _fmt(x: Any, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _row(label: str, r: dict[str, Any]) -> str:
    rw, wr = r["reward"], r.get("win_rate")
    ci = f"[{_fmt(rw.get('ci_low'))}, {_fmt(rw.get('ci_high'))}]"
    wci = f"[{_fmt(wr['ci_low'])}, {_fmt(wr['ci_high'])}]" if wr else "–"
    step = r.get("step")
    name = r["name"] + (" (= final)" if r.get("final") else "")
    return (f"| {label} | {name} | {step if step is not None else '–'} | {_fmt(r['kl'])} | {_fmt(r['kl_k3'])} "
            f"| {_fmt(rw['mean'])} | {ci} | {_fmt(wr['mean'] if wr else None)} | {wci} |")


def table(runs: list[Run], sft_points: list[dict[str, Any]] | None = None) -> str:
    """Markdown table: π_sft once (the step-0 point of every run), then every checkpoint of every run."""
    lines = [
        "| run | checkpoint | step | KL (k1, nats) | KL (k3, nats) | reward | reward CI | win rate | win-rate CI |",
        "|---|---|---:|---:|---:|---:|---|---:|---|",
    ]
    lines += [_row(SFT_LABEL, r) for r in (_sft_points(runs) if sft_points is None else sft_points)]
    for label, data in runs:
        lines += [_row(label, r) for r in data["results"] if not r.get("sft")]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- plot
def judge_name(data: dict[str, Any]) -> str | None:
    """What the file's rewards come from, short enough for an axis (None if not recorded): ``oracle
    my_reward.py:score`` (a file), ``oracle vader_sentiment`` (a module's function), ``reward model rm/final``."""
    settings = data.get("settings") or {}
    if settings.get("oracle"):
        module, _, func = str(settings["oracle"]).rpartition(":")
        return f"oracle {os.path.basename(module)}:{func}" if module.endswith(".py") else f"oracle {func}"
    if settings.get("reward_model"):
        parts = Path(str(settings["reward_model"])).parts
        return "reward model " + "/".join(parts[-2:])
    return None


def axis_labels(kl_key: str, judges: list[str], confidence: float | None) -> tuple[str, str]:
    """``(x label, y label)``: KL in nats with its estimator; the reward named by its judge(s), with the CI."""
    est = "k3 estimate" if kl_key == "kl_k3" else "k1 estimate"
    x = f"KL(π_θ ‖ π_sft) in nats ({est}, on π_θ's samples)"
    unique = list(dict.fromkeys(judges))
    source = "; ".join(unique) if unique else "judge not recorded"
    bars = f"; bars: {confidence:.0%} CI" if confidence else ""
    return x, f"mean reward\n({source}{bars})"


def plot_frontier(runs: list[Run], output: Path, *, kl_key: str = "kl", title: str | None = None,
                  judges: list[str] | None = None, confidence: float | None = None) -> None:
    """Reward (with CI bars) against KL, one line of checkpoints per run starting at π_sft, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    def bars(rs: list[dict[str, Any]]) -> list[list[float]]:
        lo = [r["reward"]["mean"] - r["reward"].get("ci_low", r["reward"]["mean"]) for r in rs]
        hi = [r["reward"].get("ci_high", r["reward"]["mean"]) - r["reward"]["mean"] for r in rs]
        return [[v if math.isfinite(v) else 0.0 for v in lo], [v if math.isfinite(v) else 0.0 for v in hi]]

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label, data in runs:
        rs = data["results"]
        if not any(not r.get("sft") for r in rs):
            continue  # π_sft alone: drawn below
        ax.errorbar([r[kl_key] for r in rs], [r["reward"]["mean"] for r in rs], yerr=bars(rs), marker="o",
                    markersize=4, capsize=2, linewidth=1.2, label=label)
    start = _sft_points(runs)
    if start:
        ax.errorbar([r[kl_key] for r in start], [r["reward"]["mean"] for r in start], yerr=bars(start), fmt="*",
                    color="black", markersize=11, capsize=2, zorder=5, label=f"{SFT_LABEL} (step 0 of every run)")
    xlabel, ylabel = axis_labels(kl_key, judges or [], confidence)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title or "reward–KL frontier")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, output, dpi=150)
    plt.close(fig)


def collect(paths: list[str], labels: list[str] | None = None) -> tuple[list[Run], list[dict[str, Any]]]:
    """Load the eval JSONs into runs; returns ``(runs, files' data)``. A file without π_sft borrows the point of
    another file that measured KL against the same π_sft; a file holding only π_sft adds no run of its own."""
    files = [load_eval(p) for p in paths]
    starts = {sft_model(d): sft_point(d) for d in files if sft_point(d) is not None}
    runs: list[Run] = []
    for i, (p, data) in enumerate(zip(paths, files)):
        label = labels[i] if labels else str(data.get("run") or Path(p).stem)
        got = group_runs(data, label, starts.get(sft_model(data)))
        if not got and sft_point(data) is not None and not any(sft_model(d) == sft_model(data) and d is not data
                                                                 for d in files):
            got = [(SFT_LABEL, {"results": [sft_point(data)]})]  # π_sft was all there was to draw
        runs.extend(got)
    return runs, files


def frontier(paths: list[str], output: str, *, table_path: str | None = None, kl_key: str = "kl",
             labels: list[str] | None = None, title: str | None = None) -> tuple[Path, Path]:
    """Load the eval JSONs, write the PNG and the Markdown table; return both paths."""
    if not paths:
        raise InputError("no eval JSONs given", field="files", fix="exoalign plot frontier a.json b.json --output f.png")
    if Path(output).suffix.lower() != ".png":
        raise InputError("the plot must be a .png file", field="output", fix="name it e.g. frontier.png")
    if labels is not None and len(labels) != len(paths):
        raise InputError(f"{len(labels)} labels for {len(paths)} files", field="labels", fix="give one label per file")
    runs, files = collect(paths, labels)
    png = Path(output)
    md = Path(table_path) if table_path else png.with_suffix(".md")
    text = table(runs)
    judges = [j for j in (judge_name(d) for d in files) if j]
    confidence = files[0].get("confidence") if all(d.get("confidence") == files[0].get("confidence") for d in files) else None
    plot_frontier(runs, png, kl_key=kl_key, title=title, judges=judges,
                  confidence=confidence if _number(confidence, finite=True) else None)
    atomic_write(md, text)
    return png, md


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="exoalign plot", description="plots of eval results")
    sub = parser.add_subparsers(dest="what", required=True)
    f = sub.add_parser("frontier", help="reward vs KL of every checkpoint of several runs (one PNG + a table)")
    f.add_argument("files", nargs="+", help="eval JSONs written by exoalign eval (each holds one or more runs)")
    f.add_argument("--output", "-o", default="frontier.png", help="PNG to write (default frontier.png)")
    f.add_argument("--table", default=None, help="Markdown table to write (default: the PNG's name with .md)")
    f.add_argument("--kl", choices=("kl", "kl_k3"), default="kl", help="KL estimate on the x axis (default kl)")
    f.add_argument("--labels", default=None, help="comma-separated run labels, one per file (default: run names)")
    f.add_argument("--title", default=None, help="plot title")
    args = parser.parse_args(argv)
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    png, md = frontier(args.files, args.output, table_path=args.table, kl_key=args.kl, labels=labels, title=args.title)
    print(f"wrote {png} and {md}")
    return 0
