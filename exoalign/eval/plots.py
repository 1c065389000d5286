"""``exoalign plot frontier``: the reward–KL frontier of several runs in one PNG, plus a Markdown table.

    exoalign plot frontier results/exo.json results/dpo.json --output results/frontier.png

Each argument is an eval JSON (``exoalign eval``; schema ``exoalign.eval/1``). Its results are grouped into
runs by their ``run`` field (the training output_dir they came from); a JSON holding one run is labelled by
its own ``run`` name (or ``--labels``). Every checkpoint becomes a point at ``(KL(π_θ‖π_sft), mean reward)``
with the reward's confidence interval as an error bar; a run's points are joined in step order, one colour
per run — the paper's IMDB figure (reward against KL for every checkpoint of EXO and DPO). ``--kl kl_k3`` plots the k3 estimate instead of the authors' ``kl``. The table
(``<output stem>.md`` unless ``--table``) lists every point with both KL estimates, the reward and the win rate.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..config import ArgumentParser
from ..errors import InputError

SCHEMA = "exoalign.eval/1"


def load_eval(path: str) -> dict[str, Any]:
    """Read and check one eval JSON; InputError naming the file and the missing field otherwise."""
    p = Path(path)
    if not p.is_file():
        raise InputError("no such eval JSON", file=path, fix="give files written by exoalign eval")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
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


def _order(r: dict[str, Any]) -> tuple[float, str]:
    step = r.get("step")
    return (float(step) if isinstance(step, (int, float)) else math.inf, r["name"])


def _fmt(x: Any, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def table(runs: list[tuple[str, dict[str, Any]]]) -> str:
    """Markdown table of every checkpoint of every run."""
    lines = [
        "| run | checkpoint | step | KL (k1) | KL (k3) | reward | reward CI | win rate | win-rate CI |",
        "|---|---|---:|---:|---:|---:|---|---:|---|",
    ]
    for label, data in runs:
        for r in sorted(data["results"], key=_order):
            rw, wr = r["reward"], r.get("win_rate")
            ci = f"[{_fmt(rw.get('ci_low'))}, {_fmt(rw.get('ci_high'))}]"
            wci = f"[{_fmt(wr['ci_low'])}, {_fmt(wr['ci_high'])}]" if wr else "–"
            step = r.get("step")
            lines.append(
                f"| {label} | {r['name']} | {step if step is not None else '–'} | {_fmt(r['kl'])} | {_fmt(r['kl_k3'])} "
                f"| {_fmt(rw['mean'])} | {ci} | {_fmt(wr['mean'] if wr else None)} | {wci} |"
            )
    return "\n".join(lines) + "\n"


def plot_frontier(runs: list[tuple[str, dict[str, Any]]], output: Path, *, kl_key: str = "kl", title: str | None = None) -> None:
    """Reward (with CI bars) against KL, one line of checkpoints per run, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label, data in runs:
        rs = sorted(data["results"], key=_order)
        x = [r[kl_key] for r in rs]
        y = [r["reward"]["mean"] for r in rs]
        lo = [r["reward"]["mean"] - r["reward"].get("ci_low", r["reward"]["mean"]) for r in rs]
        hi = [r["reward"].get("ci_high", r["reward"]["mean"]) - r["reward"]["mean"] for r in rs]
        yerr = [[v if math.isfinite(v) else 0.0 for v in lo], [v if math.isfinite(v) else 0.0 for v in hi]]
        ax.errorbar(x, y, yerr=yerr, marker="o", markersize=4, capsize=2, linewidth=1.2, label=label)
    ax.set_xlabel("KL(π_θ ‖ π_sft)" + (" (k3 estimate)" if kl_key == "kl_k3" else ""))
    ax.set_ylabel("mean reward")
    ax.set_title(title or "reward–KL frontier")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.stem + ".tmp" + output.suffix)  # savefig picks the format from the suffix
    fig.savefig(tmp, dpi=150)
    plt.close(fig)
    os.replace(tmp, output)


def group_runs(data: dict[str, Any], label: str) -> list[tuple[str, dict[str, Any]]]:
    """Split one eval JSON into ``(label, {"results": [...]})`` per run (its results' ``run`` field)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in data["results"]:
        groups.setdefault(str(r.get("run") or label), []).append(r)
    if len(groups) == 1:
        return [(label, {"results": next(iter(groups.values()))})]
    return [(run, {"results": rs}) for run, rs in groups.items()]


def frontier(paths: list[str], output: str, *, table_path: str | None = None, kl_key: str = "kl",
             labels: list[str] | None = None, title: str | None = None) -> tuple[Path, Path]:
    """Load the eval JSONs, write the PNG and the Markdown table; return both paths."""
    if not paths:
        raise InputError("no eval JSONs given", field="files", fix="exoalign plot frontier a.json b.json --output f.png")
    if Path(output).suffix.lower() != ".png":
        raise InputError("the plot must be a .png file", field="output", fix="name it e.g. frontier.png")
    if labels is not None and len(labels) != len(paths):
        raise InputError(f"{len(labels)} labels for {len(paths)} files", field="labels", fix="give one label per file")
    runs = []
    for i, p in enumerate(paths):
        data = load_eval(p)
        label = labels[i] if labels else str(data.get("run") or Path(p).stem)
        runs.extend(group_runs(data, label))
    png = Path(output)
    md = Path(table_path) if table_path else png.with_suffix(".md")
    text = table(runs)
    plot_frontier(runs, png, kl_key=kl_key, title=title)
    tmp = md.with_name(md.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, md)
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
