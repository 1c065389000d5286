"""Outputs of the exact-optimum benchmark: results.json, results.md, illustration.json and three PNGs.

Every file is written to ``name.tmp`` and renamed, so an interrupted run never leaves a half-written file.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..fileio import atomic_savefig, atomic_write
from .metrics import METRICS


def _online_key(n: str) -> tuple | None:
    """``(reuse, K, 0 exo | 1 dpo | 2 rloo | 3 ppo)`` for an online method name, None otherwise."""
    for i, prefix in enumerate(("online-exo-k", "online-dpo-k", "rloo-k", "ppo-k")):
        if n.startswith(prefix):
            k, _, r = n[len(prefix):].partition("-r")
            return (int(r or 1), int(k), i)
    return None


def method_order(names: list[str]) -> list[str]:
    """Anchors and references first, then each EXO method next to its DPO counterpart, then IPO, then the online
    methods (by reuse, then K: EXO, DPO, RLOO, PPO)."""
    def key(n: str) -> tuple:
        if _online_key(n) is not None:
            return (6, *_online_key(n))
        if n in ("optimum", "rl-exact", "fkl-exact"):
            return (0, ("optimum", "rl-exact", "fkl-exact").index(n), 0)
        if n.startswith("best-of-n-"):
            return (1, int(n.rsplit("-", 1)[1]), 0)
        if n.endswith("-pref"):
            return (2, 0, n.startswith("dpo"))
        if "-rw-k" in n:
            return (3, int(n.rsplit("k", 1)[1]), n.startswith("dpo"))
        if n == "ipo":
            return (4, 0, 0)
        return (5, 0, 0)  # sft after the offline methods
    return sorted(names, key=key)


def pairs(methods: dict) -> list[tuple[str, str]]:
    """``(exo name, dpo name)`` for every setting trained with both losses."""
    return [(n, "dpo" + n[3:]) for n in method_order(list(methods)) if n.startswith("exo-") and "dpo" + n[3:] in methods]


def _ess(rec: dict, key: str) -> str:
    return f"{rec[key]:.3f}" if key in rec else "—"


def online_table(methods: dict) -> list[str]:
    """Offline vs online at every K: gap (ESS of p / ESS of q, fractions of K, mean over training)."""
    keys = [k for k in (_online_key(n) for n in methods) if k is not None]
    if not keys:
        return []
    reuses, ks = sorted({r for r, _, _ in keys}), sorted({k for _, k, _ in keys})
    cols = ["exo-rw-k{k}", "dpo-rw-k{k}"] + [f"{m}-k{{k}}{'' if r == 1 else f'-r{r}'}" for r in reuses
                                               for m in ("online-exo", "online-dpo", "rloo", "ppo")]
    head = ["offline EXO-rw", "offline DPO-rw"] + [f"{m} r{r}" for r in reuses
                                                   for m in ("online EXO", "online DPO", "RLOO", "PPO")]
    lines = ["", "## Offline vs online (gap, and ESS of p / of q as fractions of K)", "",
             "ESS = (1/Σp²)/K of the loss's group distribution p (policy side) and q (target), averaged over training "
             "steps and groups. r{R}: each sampled round is used for R steps (R = 1: fresh samples every step). "
             "RLOO with R > 1 is naive reuse (no importance ratio); PPO reuses with the clipped ratio. rl-exact: "
             f"{methods['rl-exact']['gap']:.3f}." if "rl-exact" in methods else "", "",
             "| K | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for k in ks:
        cells = []
        for c in cols:
            rec = methods.get(c.format(k=k))
            cells.append("—" if rec is None else f"{rec['gap']:.3f} ({_ess(rec, 'ess')} / {_ess(rec, 'ess_q')})")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return lines


def paired_diff(methods: dict, exo: str, dpo: str) -> dict[str, float]:
    """Per-seed ``gap(DPO) − gap(EXO)`` on the same offline data: mean, std, and the seeds EXO wins."""
    a, b = methods[exo]["per_seed"]["gap"], methods[dpo]["per_seed"]["gap"]
    d = [y - x for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    std = (sum((v - mean) ** 2 for v in d) / (len(d) - 1)) ** 0.5 if len(d) > 1 else 0.0
    return {"mean": mean, "std": std, "wins": sum(v > 0 for v in d), "n": len(d),
            "rel": mean / methods[dpo]["gap"] if methods[dpo]["gap"] else 0.0}


def markdown(results: dict, toy: dict) -> str:
    """results.md: the settings, the table of exact metrics, the EXO-vs-DPO comparison and the illustration."""
    cfg, methods = results["config"], results["methods"]
    lines = [
        "# Exact-optimum benchmark",
        "",
        f"V={cfg['vocab']}, L={cfg['length']} ({cfg['completions_per_prompt']} completions per prompt, enumerated), "
        f"{cfg['prompts']} prompts, GRU policy hidden={cfg['hidden']} ({cfg['policy_params']} parameters). "
        f"β={cfg['beta']:g} (β_π={cfg['beta_pi']:g}, β_r={cfg['beta_r']:g}), ε={cfg['eps']:g}. "
        f"Offline data: {cfg['pool']} completions per prompt from π_sft; {cfg['batch']} completions per step, "
        f"{cfg['steps']} steps, Adam lr {cfg['lr']:g} (cosine), seeds {cfg['seed_list']}.",
        "",
        "gap = (J(π*) − J(π)) / (J(π*) − J(π_sft)): 0 is optimal, 1 is no better than π_sft. Means over seeds "
        "(± std over seeds where there are several).",
        "",
        "| method | gap | J | KL(π‖π*) | KL(π*‖π) | reward | KL(π‖π_sft) | ESS p | ESS q | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in method_order(list(methods)):
        r = methods[n]
        gap = f"{r['gap']:.3f}" + (f" ± {r['gap_std']:.3f}" if "gap_std" in r else "")
        lines.append(f"| {n} | {gap} | " + " | ".join(f"{r[m]:.3f}" for m in METRICS[1:])
                     + f" | {_ess(r, 'ess')} | {_ess(r, 'ess_q')} | {r['seeds']} |")
    lines += ["", "## EXO vs DPO (paired by seed: same offline data)", "",
              "| setting | gap EXO | gap DPO | DPO − EXO | EXO better on |", "|---|---|---|---|---|"]
    for exo, dpo in pairs(methods):
        d = paired_diff(methods, exo, dpo)
        lines.append(f"| {exo[4:]} | {methods[exo]['gap']:.3f} | {methods[dpo]['gap']:.3f} | "
                     f"{d['mean']:+.3f} ± {d['std']:.3f} | {d['wins']}/{d['n']} seeds |")
    lines += online_table(methods)
    m = toy["metrics"]
    lines += ["", "## 1-D illustration (unimodal Gaussian policy, bimodal π*, rw targets)", "",
              "rkl-exact / fkl-exact: exact reverse / forward KL projections of π* onto the Gaussian family.", "",
              "| method | gap | μ | σ | KL(π‖π*) | KL(π*‖π) |", "|---|---|---|---|---|---|"]
    for name in [n for n in ("exo", "dpo", "rkl-exact", "fkl-exact") if n in m]:
        r = m[name]
        lines.append(f"| {name} | {r['gap']:.3f} | {r['mu']:.3f} | {r['sigma']:.3f} | {r['kl_to_opt']:.3f} | "
                     f"{r['kl_from_opt']:.3f} |")
    lines += ["", "![illustration](illustration.png)", "", "![gap](gap.png)", "", "![curves](curves.png)", "",
              *(["![online](online.png)", ""] if any(_online_key(n) for n in methods) else []),
              f"Versions: {', '.join(f'{k} {v}' for k, v in cfg['versions'].items())}. Wall time {cfg['wall_s']} s.", ""]
    return "\n".join(lines)


def plot_gaps(results: dict, path: Path) -> None:
    """Horizontal bars of the mean gap per method, with one dot per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = results["methods"]
    names = [n for n in method_order(list(methods)) if n != "optimum"]
    color = lambda n: ("tab:red" if n.startswith("exo") else "tab:blue" if n.startswith("dpo")
                       else "tab:purple" if n == "ipo" else "darkred" if n.startswith("online-exo")
                       else "navy" if n.startswith("online-dpo") else "tab:green" if n.startswith("rloo")
                       else "tab:orange" if n.startswith("ppo") else "0.4")
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(names) + 1.2))
    ys = range(len(names))
    ax.barh(list(ys), [methods[n]["gap"] for n in names], color=[color(n) for n in names], alpha=0.75)
    for y, n in zip(ys, names):
        seeds = methods[n]["per_seed"]["gap"]
        ax.plot(seeds, [y] * len(seeds), "k.", ms=3)
    ax.set_yticks(list(ys), names)
    ax.invert_yaxis()
    ax.axvline(1.0, color="0.5", lw=0.8, ls="--")
    ax.set_xlabel("optimality gap (0 = π*, 1 = π_sft)")
    ax.set_title(f"Exact optimality gap, β={results['config']['beta']:g}")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)


def plot_curves(results: dict, path: Path) -> None:
    """Mean exact gap against training step for every trained method and rl-exact."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = results["methods"]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    # one colour per setting (pref, rw-k2, …): EXO solid, DPO dashed, so each pair reads side by side
    settings = sorted({n.split("-", 1)[1] for n in methods if n.startswith(("exo-", "dpo-"))})
    palette = dict(zip(settings, plt.get_cmap("tab10").colors))
    for n in method_order(list(methods)):
        if "curve" not in methods[n] or _online_key(n) is not None:
            continue
        steps, gaps = zip(*methods[n]["curve"])
        if n == "rl-exact":
            style = dict(color="k", lw=2)
        elif n == "fkl-exact":
            style = dict(color="0.5", lw=2, ls=":")
        elif n.startswith(("exo-", "dpo-")):
            style = dict(color=palette[n.split("-", 1)[1]], ls="-" if n.startswith("exo") else "--")
        else:
            style = dict(color="tab:olive", ls="-.")
        ax.plot(steps, gaps, label=n, **style)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("optimality gap (log scale)")
    ax.set_title("Exact gap during training (mean over seeds)")
    ax.legend(fontsize=7, ncol=2, frameon=False)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)


def plot_online(results: dict, path: Path) -> None:
    """Gap curves at the largest K: offline EXO/DPO-rw, online EXO/DPO/RLOO/PPO at every reuse, and rl-exact."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = results["methods"]
    keys = {n: _online_key(n) for n in methods if _online_key(n) is not None}
    k = max(key[1] for key in keys.values())
    reuses = sorted({key[0] for key in keys.values()})
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    lines = [("rl-exact", dict(color="k", lw=2)), (f"exo-rw-k{k}", dict(color="tab:red", ls="--")),
             (f"dpo-rw-k{k}", dict(color="tab:blue", ls="--"))]
    styles = ["-", ":", "-.", (0, (5, 1))]
    for j, r in enumerate(reuses):
        suffix = "" if r == 1 else f"-r{r}"
        for m, c in (("online-exo", "darkred"), ("online-dpo", "navy"), ("rloo", "tab:green"), ("ppo", "tab:orange")):
            lines.append((f"{m}-k{k}{suffix}", dict(color=c, ls=styles[j % len(styles)])))
    for n, style in lines:
        if n in methods and "curve" in methods[n]:
            steps, gaps = zip(*methods[n]["curve"])
            ax.plot(steps, gaps, label=n, **style)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("optimality gap (log scale)")
    ax.set_title(f"Offline vs online at K={k} (mean over seeds)")
    ax.legend(fontsize=7, ncol=2, frameon=False)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)


def write_all(results: dict, toy: dict, out_dir: Path) -> list[Path]:
    """Write every output file into ``out_dir``; return their paths."""
    from .toy import plot_toy

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / n for n in ("results.json", "results.md", "illustration.json", "illustration.png",
                                   "gap.png", "curves.png")]
    atomic_write(paths[0], json.dumps(results, indent=1) + "\n")
    atomic_write(paths[1], markdown(results, toy))
    atomic_write(paths[2], json.dumps(toy, indent=1) + "\n")
    atomic_write(paths[3], lambda tmp: plot_toy(toy, str(tmp), toy.get("beta", 0.5)), suffix=".png")
    plot_gaps(results, paths[4])
    plot_curves(results, paths[5])
    if any(_online_key(n) is not None for n in results["methods"]):
        paths.append(out_dir / "online.png")
        plot_online(results, paths[6])
    return paths
