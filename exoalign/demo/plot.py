"""``frontier.png``: every run's checkpoints and each method's frontier (its envelope over β_π)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..fileio import atomic_savefig
from .frontier import envelope
from .settings import fmt_beta

MARKERS = ("o", "s", "^", "D", "v", "P")


def plot(points: dict[str, list[dict[str, Any]]], output: Path, *, title: str) -> None:
    """Reward (95% CI bars) against KL: thin lines = one run per β_π in step order, thick = the method's
    envelope; π_sft is the common step-0 point at KL 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=120)
    betas = sorted({p["beta_pi"] for pts in points.values() for p in pts})
    for i, (method, pts) in enumerate(points.items()):
        color = f"C{i}"
        for j, beta in enumerate(betas):
            run = sorted((p for p in pts if p["beta_pi"] == beta), key=lambda p: p["step"])
            if not run:
                continue
            x = [p["kl"] for p in run]
            y = [p["reward"] for p in run]
            yerr = [[p["reward"] - p["reward_ci"][0] for p in run], [p["reward_ci"][1] - p["reward"] for p in run]]
            ax.errorbar(x, y, yerr=yerr, color=color, marker=MARKERS[j % len(MARKERS)], markersize=4, capsize=2,
                        linewidth=0.7, alpha=0.55, linestyle="--")
        xs, ys = envelope(pts)
        ax.plot(xs, ys, color=color, linewidth=2.2, label=f"{method} (envelope)")
    for j, beta in enumerate(betas):  # legend entries for the markers
        ax.plot([], [], color="gray", marker=MARKERS[j % len(MARKERS)], linestyle="--", linewidth=0.7,
                label=f"β_π = {fmt_beta(beta)} run")
    ax.set_xlabel("KL(π_θ ‖ π_sft), nats per completion (k1 estimate on the policy's samples)")
    ax.set_ylabel("mean reward (VADER compound of the completion)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    atomic_savefig(fig, output)
    plt.close(fig)
