"""Frontiers and the verdict: envelopes of checkpoints over β, compared with a paired bootstrap over prompts.

A method's frontier is the upper envelope of all its checkpoints (every β_π, every step; π_sft is step 0 of
every run) in the (KL, reward) plane — the most reward reached at no more than a given KL — linear between
envelope points. Two frontiers are compared on the KL range both cover (from 0 to the smaller of their
largest KLs) by the mean difference of the envelopes over that range: "higher reward at equal KL", averaged
over the KL budgets both reached.

Its uncertainty comes from a paired bootstrap over the held-out prompts: every checkpoint was evaluated on the
same prompts with the same random streams, so one resample of prompt indices (with replacement) recomputes
every checkpoint's mean reward and mean KL on those prompts, both envelopes, and the gap. The verdict says
"EXO above" or "EXO below" only when the interval excludes 0, and "no difference detected" otherwise.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def envelope(points: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Upper-left envelope ``(kl, reward)``: the points no other point beats with less KL and more reward.

    KL estimates of checkpoints near π_sft can come out slightly negative (sampling noise); they are clipped
    to 0 so every frontier starts on the reward axis.
    """
    return _envelope(np.asarray([p["kl"] for p in points]), np.asarray([p["reward"] for p in points]))


def _envelope(kl: np.ndarray, reward: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((-reward, np.maximum(kl, 0.0)))  # by KL, the higher reward first on ties
    xs, ys = [], []
    for i in order:
        if not ys or reward[i] > ys[-1]:
            xs.append(max(float(kl[i]), 0.0))
            ys.append(float(reward[i]))
    return np.asarray(xs), np.asarray(ys)


def reward_at(env: tuple[np.ndarray, np.ndarray], kl: np.ndarray) -> np.ndarray:
    """Best reward of the envelope within each KL budget, linear between envelope points."""
    xs, ys = env
    if len(xs) == 1:
        return np.full_like(kl, ys[0], dtype=np.float64)
    return np.interp(kl, xs, ys)  # constant beyond the ends: no extrapolation beyond what was reached


def _gap(kl_a: np.ndarray, r_a: np.ndarray, kl_b: np.ndarray, r_b: np.ndarray, n_grid: int) -> tuple[float, ...]:
    """``(mean gap, share of the range where a is higher, kl_max, a at kl_max, b at kl_max)``."""
    ea, eb = _envelope(kl_a, r_a), _envelope(kl_b, r_b)
    # The range both runs explored, whether or not their late checkpoints improved the reward.
    kl_max = max(0.0, float(min(kl_a.max(), kl_b.max())))
    grid = np.linspace(0.0, kl_max, n_grid)
    ya, yb = reward_at(ea, grid), reward_at(eb, grid)
    diff = ya - yb
    return float(diff.mean()), float((diff > 0).mean()), kl_max, float(ya[-1]), float(yb[-1])


def compare(a: list[dict[str, Any]], b: list[dict[str, Any]], n_grid: int = 201) -> dict[str, float]:
    """Frontier of ``a`` minus frontier of ``b`` over the KL range both reached (point estimates)."""
    arr = lambda pts, k: np.asarray([p[k] for p in pts], dtype=np.float64)  # noqa: E731
    gap, frac, kl_max, ya, yb = _gap(arr(a, "kl"), arr(a, "reward"), arr(b, "kl"), arr(b, "reward"), n_grid)
    return {"kl_max": kl_max, "mean_reward_gap": gap, "frac_above": frac, "reward_a_at_kl_max": ya,
            "reward_b_at_kl_max": yb}


def paired_bootstrap(a: list[dict[str, Any]], b: list[dict[str, Any]], *, n_boot: int, seed: int,
                     confidence: float = 0.95, n_grid: int = 101) -> dict[str, Any]:
    """:func:`compare` with a paired-bootstrap interval of the mean gap over the held-out prompts.

    Each point carries ``prompt_reward`` and ``prompt_kl``: its per-prompt means over the samples, on the same
    prompts in the same order for every point. Resampling the prompts once for all points keeps the pairing
    (the common random numbers), so the interval measures prompt-to-prompt noise of the *difference*.
    """
    out: dict[str, Any] = compare(a, b)
    Ra = np.asarray([p["prompt_reward"] for p in a], dtype=np.float64)  # (Ca, n)
    Ka = np.asarray([p["prompt_kl"] for p in a], dtype=np.float64)  # (Ca, n)
    Rb = np.asarray([p["prompt_reward"] for p in b], dtype=np.float64)  # (Cb, n)
    Kb = np.asarray([p["prompt_kl"] for p in b], dtype=np.float64)  # (Cb, n)
    n = Ra.shape[1]
    if Rb.shape[1] != n:
        raise ValueError(f"the runs were evaluated on different prompts ({n} vs {Rb.shape[1]})")
    rng = np.random.default_rng(seed)
    w = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot) / n  # (B, n) resampling weights of the prompts
    ra, ka, rb, kb = w @ Ra.T, w @ Ka.T, w @ Rb.T, w @ Kb.T  # (B, Ca), (B, Ca), (B, Cb), (B, Cb)
    gaps = np.asarray([_gap(ka[i], ra[i], kb[i], rb[i], n_grid)[0] for i in range(n_boot)])
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(gaps, [alpha, 1 - alpha])
    out.update({"ci": [float(lo), float(hi)], "confidence": confidence, "n_boot": n_boot, "n_prompts": n,
                "gap_se": float(gaps.std(ddof=1)), "side": side(float(lo), float(hi)), **power(lo, hi, gaps)})
    return out


MDE_Z = 1.959964 + 0.841621
"""z_{0.975} + z_{0.80}: a true gap of MDE_Z standard errors is detected (interval excludes 0) 80% of the time."""


def power(lo: float, hi: float, gaps: np.ndarray) -> dict[str, float]:
    """The power a comparison reached: its interval's half-width and the smallest true gap it would call
    above/below with 80% probability (normal approximation on the bootstrap standard error)."""
    return {"ci_half_width": float(hi - lo) / 2, "mde80": MDE_Z * float(gaps.std(ddof=1))}


def pooled_bootstrap(a: list[list[dict[str, Any]]], b: list[list[dict[str, Any]]], *, n_boot: int, seed: int,
                     confidence: float = 0.95, n_grid: int = 101) -> dict[str, Any]:
    """The gap pooled over seeds: the mean over seeds of each seed's frontier gap (:func:`compare`), with a
    paired bootstrap over held-out prompts stratified by seed (each resample draws every seed's prompts from
    that seed's own, keeping every checkpoint of a seed paired on them). ``a[s]``, ``b[s]``: seed s's points."""
    if len(a) != len(b) or not a:
        raise ValueError("pooled_bootstrap needs the same seeds, at least one, for both methods")
    per_seed = [compare(x, y) for x, y in zip(a, b)]
    rng = np.random.default_rng(seed)
    gaps = np.zeros(n_boot)
    for x, y in zip(a, b):  # (B,) gap of this seed on each resample, accumulated into the mean over seeds
        Ra, Ka = (np.asarray([p[k] for p in x], dtype=np.float64) for k in ("prompt_reward", "prompt_kl"))  # (Ca, n)
        Rb, Kb = (np.asarray([p[k] for p in y], dtype=np.float64) for k in ("prompt_reward", "prompt_kl"))  # (Cb, n)
        n = Ra.shape[1]
        w = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot) / n  # (B, n)
        ra, ka, rb, kb = w @ Ra.T, w @ Ka.T, w @ Rb.T, w @ Kb.T
        gaps += np.asarray([_gap(ka[i], ra[i], kb[i], rb[i], n_grid)[0] for i in range(n_boot)]) / len(a)
    alpha = (1 - confidence) / 2
    lo, hi = (float(v) for v in np.quantile(gaps, [alpha, 1 - alpha]))
    mean = lambda k: float(np.mean([c[k] for c in per_seed]))  # noqa: E731
    return {"mean_reward_gap": mean("mean_reward_gap"), "ci": [lo, hi], "side": side(lo, hi),
            "kl_max": min(c["kl_max"] for c in per_seed), "frac_above": mean("frac_above"),
            "reward_a_at_kl_max": mean("reward_a_at_kl_max"), "reward_b_at_kl_max": mean("reward_b_at_kl_max"),
            "per_seed_gap": [c["mean_reward_gap"] for c in per_seed], "n_seeds": len(a),
            "n_prompts": int(sum(len(x[0]["prompt_reward"]) for x in a)), "confidence": confidence,
            "n_boot": n_boot, "gap_se": float(gaps.std(ddof=1)), **power(lo, hi, gaps)}


def side(lo: float, hi: float) -> str:
    """The verdict from an interval: ``above`` / ``below`` only when it excludes 0."""
    return "above" if lo > 0 else "below" if hi < 0 else "no difference detected"


def verdict(comparison: dict[str, dict[str, Any]]) -> str:
    """One sentence per comparison, from its paired interval (never from the point estimate alone)."""
    lines = []
    for key, c in comparison.items():
        a, b = key.split("_vs_")
        if c["kl_max"] <= 0:
            lines.append(f"{a} vs {b}: no common KL range (a run did not move from π_sft); no verdict.")
            continue
        lo, hi = c["ci"]
        s = c["side"]
        head = f"{a} {s.upper()} {b}" if s != "no difference detected" else f"{a} vs {b}: NO DIFFERENCE DETECTED"
        lines.append(
            f"{head} — mean reward gap {c['mean_reward_gap']:+.3f} at equal KL over KL in [0, {c['kl_max']:.2f}] "
            f"nats, {100 * c['confidence']:.0f}% paired-bootstrap CI [{lo:+.3f}, {hi:+.3f}] over {c['n_prompts']} "
            f"held-out prompts; higher on {100 * c['frac_above']:.0f}% of the range (at KL {c['kl_max']:.2f}: "
            f"{c['reward_a_at_kl_max']:.3f} vs {c['reward_b_at_kl_max']:.3f})."
        )
    return "\n".join(lines)
