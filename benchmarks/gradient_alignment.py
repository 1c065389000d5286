"""Gradient alignment of EXO and DPO with the reverse and forward KL on a tabular policy.

Ji et al., ICML 2024 (https://arxiv.org/abs/2402.00856), Sec. 3–4, state for completions ``y_1..y_K ~ π_sft``
and reward targets ``q = softmax(r / β_r)`` over the K samples::

    lim_{K→∞} ∇_θ E[L_exo] = ∇_θ KL(π_θ^{β_π} ‖ π*_{β_r})       (reverse KL: mode-seeking, the RL objective)
    lim_{K→∞} ∇_θ E[L_dpo] = ∇_θ KL(π*_{β_r} ‖ π_θ^{β_π})       (forward KL: mean-seeking)

with ``π_θ^{β_π} ∝ π_sft (π_θ / π_sft)^{β_π}`` and ``π*_{β_r} ∝ π_sft exp(r / β_r)``. Why: the policy's
distribution over the samples is ``p_i ∝ (π_θ/π_sft)^{β_π}(y_i)``; as K grows its normaliser
``Σ_j (π_θ/π_sft)^{β_π}(y_j)`` tends to ``K · E_{π_sft}[(π_θ/π_sft)^{β_π}]``, so ``p_i ≈ π_θ^{β_π}(y_i) / (K
π_sft(y_i))``, and the sum over the K samples becomes an importance-weighted expectation under π_sft.

This script checks the statement where everything is exact: one prompt, ``n`` outcomes, ``π_θ = softmax(θ)``
with θ the logits. For each K it samples many groups from π_sft, runs the library's own ``exo``/``dpo``
(with ``reward_targets``), averages their gradient w.r.t. θ over the groups (a Monte-Carlo estimate of the
expected gradient), and reports the cosine similarity with the exact gradients of both KLs (autograd on the
full distributions). ``tests/test_loss_theorem.py`` runs a small version and asserts the trend.

Run: ``python benchmarks/gradient_alignment.py`` (writes ``benchmarks/results/gradient_alignment.{json,md}``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import exoalign
from exoalign.losses import dpo, exo, reward_targets

DEFAULT_KS = (2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class Problem:
    """A tabular alignment problem: one prompt with ``n`` possible completions (float64 throughout)."""

    theta: torch.Tensor  # (n,) logits of the policy being differentiated
    logp_sft: torch.Tensor  # (n,) log π_sft
    rewards: torch.Tensor  # (n,) r(y)
    beta_pi: float
    beta_r: float

    def log_pi_beta(self, theta: torch.Tensor) -> torch.Tensor:
        """``log π_θ^{β_π}``, with ``π_θ^{β_π} ∝ π_sft (π_θ/π_sft)^{β_π}``. Shape (n,)."""
        logp = theta.log_softmax(-1)
        return (self.logp_sft + self.beta_pi * (logp - self.logp_sft)).log_softmax(-1)

    def log_pi_star(self) -> torch.Tensor:
        """``log π*_{β_r}``, with ``π*_{β_r} ∝ π_sft exp(r/β_r)``. Shape (n,)."""
        return (self.logp_sft + self.rewards / self.beta_r).log_softmax(-1)


def make_problem(
    n: int = 256, seed: int = 0, beta_pi: float = 1.0, beta_r: float = 1.0, scale: float = 1.0
) -> Problem:
    """Random problem: π_sft logits, a policy displaced from π_sft, and rewards, all ~ N(0, scale²)."""
    g = torch.Generator().manual_seed(seed)
    sft_logits = scale * torch.randn(n, generator=g, dtype=torch.float64)
    theta = sft_logits + scale * torch.randn(n, generator=g, dtype=torch.float64)
    rewards = scale * torch.randn(n, generator=g, dtype=torch.float64)
    return Problem(theta, sft_logits.log_softmax(-1), rewards, beta_pi, beta_r)


def exact_kl(problem: Problem, direction: str) -> tuple[float, torch.Tensor]:
    """Value and θ-gradient of ``KL(π_θ^{β_π} ‖ π*)`` (``"reverse"``) or ``KL(π* ‖ π_θ^{β_π})`` (``"forward"``)."""
    theta = problem.theta.clone().requires_grad_(True)
    log_pb, log_ps = problem.log_pi_beta(theta), problem.log_pi_star()
    if direction == "reverse":
        kl = (log_pb.exp() * (log_pb - log_ps)).sum()
    elif direction == "forward":
        kl = (log_ps.exp() * (log_ps - log_pb)).sum()
    else:
        raise ValueError(f"direction must be 'reverse' or 'forward', got {direction!r}")
    (grad,) = torch.autograd.grad(kl, theta)
    return float(kl.detach()), grad


def sampled_loss_grad(
    problem: Problem, loss: str, k: int, groups: int, seed: int, chunk: int = 1 << 20
) -> tuple[float, torch.Tensor]:
    """Monte-Carlo ``E[L]`` and ``E[∇_θ L]`` of the library's ``exo``/``dpo`` over ``groups`` groups of ``k``
    completions drawn i.i.d. from π_sft (with replacement, as sampling a language model would)."""
    fn = {"exo": exo, "dpo": dpo}[loss]
    g = torch.Generator().manual_seed(seed)
    probs_sft = problem.logp_sft.exp()
    theta = problem.theta.clone().requires_grad_(True)
    total, grad = 0.0, torch.zeros_like(theta)
    per_chunk = max(1, chunk // k)
    done = 0
    while done < groups:
        m = min(per_chunk, groups - done)
        idx = torch.multinomial(probs_sft, m * k, replacement=True, generator=g).view(m, k)  # (M, K)
        policy = theta.log_softmax(-1)[idx]  # (M, K)
        targets = reward_targets(problem.rewards[idx], problem.beta_r)  # (M, K)
        losses = fn(policy, problem.logp_sft[idx], targets, problem.beta_pi).losses  # (M,)
        (g_chunk,) = torch.autograd.grad(losses.sum(), theta)
        total += float(losses.detach().sum())
        grad += g_chunk
        done += m
    return total / groups, grad / groups


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def alignment_curve(
    problem: Problem, ks: tuple[int, ...] = DEFAULT_KS, samples_per_k: int = 1 << 21, seed: int = 0
) -> dict:
    """Cosines of E[∇EXO] and E[∇DPO] with both exact KL gradients, for each K (same sample budget per K).

    ``samples_per_k`` completions are drawn for each K (``samples_per_k // K`` groups), so every K sees the
    same amount of data and the Monte-Carlo noise is comparable across rows.
    """
    rev_value, g_rev = exact_kl(problem, "reverse")
    fwd_value, g_fwd = exact_kl(problem, "forward")
    rows = []
    for i, k in enumerate(ks):
        groups = max(1, samples_per_k // k)
        exo_value, g_exo = sampled_loss_grad(problem, "exo", k, groups, seed=seed * 1000 + i)
        _, g_dpo = sampled_loss_grad(problem, "dpo", k, groups, seed=seed * 1000 + i)
        rows.append(
            {
                "K": k,
                "groups": groups,
                "exo_cos_reverse": cosine(g_exo, g_rev),
                "exo_cos_forward": cosine(g_exo, g_fwd),
                "dpo_cos_forward": cosine(g_dpo, g_fwd),
                "dpo_cos_reverse": cosine(g_dpo, g_rev),
                "exo_loss": exo_value,
            }
        )
    return {
        "reverse_kl": rev_value,
        "forward_kl": fwd_value,
        "cos_reverse_forward": cosine(g_rev, g_fwd),
        "rows": rows,
    }


# ------------------------------------------------------------------------------------------ report
def _markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [
        "# Gradient alignment of EXO and DPO (tabular policy)",
        "",
        f"Command: `{result['command']}`  ",
        f"n = {cfg['n']} outcomes, β_π = {cfg['beta_pi']}, β_r = {cfg['beta_r']}, {cfg['samples_per_k']} sampled "
        f"completions per K, seeds {cfg['seeds']} (mean over seeds; min in brackets).",
        "",
        "cos(a, b) is the cosine similarity between the Monte-Carlo expected loss gradient and the exact gradient",
        "of the reverse KL(π_θ^β_π ‖ π*) or the forward KL(π* ‖ π_θ^β_π) w.r.t. the policy logits θ.",
        "",
        "| K | EXO · reverse | EXO · forward | DPO · forward | DPO · reverse | E[L_exo] / KL_rev |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["summary"]:
        lines.append(
            f"| {row['K']} | {row['exo_cos_reverse']:.4f} ({row['exo_cos_reverse_min']:.4f}) "
            f"| {row['exo_cos_forward']:.4f} | {row['dpo_cos_forward']:.4f} ({row['dpo_cos_forward_min']:.4f}) "
            f"| {row['dpo_cos_reverse']:.4f} | {row['exo_loss_over_kl']:.4f} |"
        )
    lines += [
        "",
        f"cos(∇ reverse KL, ∇ forward KL) = {result['summary_cos_reverse_forward']:.4f} (mean over seeds): the",
        "two directions EXO and DPO could follow differ, and each loss follows its own.",
        "",
        f"torch {result['versions']['torch']}, python {result['versions']['python']}, {result['elapsed_s']:.1f} s.",
        "",
    ]
    return "\n".join(lines)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=256, help="number of outcomes of the tabular policy")
    p.add_argument("--ks", type=int, nargs="+", default=list(DEFAULT_KS), help="group sizes K")
    p.add_argument("--samples-per-k", type=int, default=1 << 21, help="sampled completions per K")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one random problem per seed")
    p.add_argument("--beta-pi", type=float, default=1.0)
    p.add_argument("--beta-r", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gradient_alignment")
    args = p.parse_args(argv)

    # Many small ops: one thread is as fast as several on an idle machine and far faster on a busy one.
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    per_seed = []
    for seed in args.seeds:
        problem = make_problem(args.n, seed, args.beta_pi, args.beta_r)
        curve = alignment_curve(problem, tuple(args.ks), args.samples_per_k, seed)
        curve["seed"] = seed
        per_seed.append(curve)
        print(f"seed {seed}: cos(rev, fwd) = {curve['cos_reverse_forward']:.3f}", file=sys.stderr)

    summary = []
    for i, k in enumerate(args.ks):
        rows = [c["rows"][i] for c in per_seed]
        summary.append(
            {
                "K": k,
                **{
                    key: sum(r[key] for r in rows) / len(rows)
                    for key in ("exo_cos_reverse", "exo_cos_forward", "dpo_cos_forward", "dpo_cos_reverse")
                },
                "exo_cos_reverse_min": min(r["exo_cos_reverse"] for r in rows),
                "dpo_cos_forward_min": min(r["dpo_cos_forward"] for r in rows),
                "exo_loss_over_kl": sum(r["exo_loss"] / c["reverse_kl"] for r, c in zip(rows, per_seed))
                / len(rows),
            }
        )
    cmd = "python benchmarks/gradient_alignment.py" + (" " + " ".join(argv) if argv else "")
    result = {
        "command": cmd
        if argv is not None
        else "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "config": {
            "n": args.n,
            "ks": args.ks,
            "samples_per_k": args.samples_per_k,
            "seeds": args.seeds,
            "beta_pi": args.beta_pi,
            "beta_r": args.beta_r,
            "threads": args.threads,
        },
        "versions": {
            "exoalign": exoalign.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "summary": summary,
        "summary_cos_reverse_forward": sum(c["cos_reverse_forward"] for c in per_seed) / len(per_seed),
        "per_seed": per_seed,
        "elapsed_s": time.perf_counter() - start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(args.out.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    md = _markdown(result)
    _write_atomic(args.out.with_suffix(".md"), md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
