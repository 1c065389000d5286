"""The paper's asymptotic claim, checked on a tabular policy (Ji et al., ICML 2024, Sec. 3–4).

With completions ``y_1..y_K ~ π_sft`` and reward targets ``q = softmax(r/β_r)``:

* ``E[∇_θ L_exo] → ∇_θ KL(π_θ^{β_π} ‖ π*_{β_r})`` (reverse KL, the RL objective with β = β_π β_r) as K → ∞;
* ``E[∇_θ L_dpo] → ∇_θ KL(π*_{β_r} ‖ π_θ^{β_π})`` (forward KL) instead,

where ``π_θ^{β_π} ∝ π_sft (π_θ/π_sft)^{β_π}`` and ``π*_{β_r} ∝ π_sft exp(r/β_r)``. The computation lives in
``benchmarks/gradient_alignment.py`` (it runs the library's ``exo``/``dpo``); this test runs a small version of
it (2^17 sampled completions per K instead of 2^21) and asserts the trend.
"""

from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path

import pytest
import torch

from exoalign.losses import exo, reward_targets

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "gradient_alignment.py"
_spec = importlib.util.spec_from_file_location("gradient_alignment", _PATH)
ga = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = ga  # dataclasses look their module up there
_spec.loader.exec_module(ga)

KS = (2, 4, 8, 16, 32, 64, 128, 256)



@pytest.fixture(scope="module")
def curve() -> dict:
    problem = ga.make_problem(n=256, seed=0, beta_pi=1.0, beta_r=1.0)
    return ga.alignment_curve(problem, KS, samples_per_k=1 << 17, seed=0)


def test_exo_gradient_approaches_reverse_kl_gradient(curve):
    """cos(E[∇L_exo], ∇KL_rev) rises with K (measured at seed 0: 0.38 at K=2, 0.91 at K=8, 1.000 at K=256)."""
    cos = [row["exo_cos_reverse"] for row in curve["rows"]]
    assert cos[-1] > 0.99
    assert cos[-1] > cos[0] + 0.3
    # monotone up to Monte-Carlo noise
    assert all(b > a - 0.01 for a, b in itertools.pairwise(cos)), cos
    # and at large K it points away from the forward KL, as far as the two KL gradients differ
    assert curve["cos_reverse_forward"] < 0.8
    assert curve["rows"][-1]["exo_cos_forward"] < 0.8


def test_dpo_gradient_approaches_forward_kl_gradient(curve):
    """cos(E[∇L_dpo], ∇KL_fwd) → 1, while its cosine with the reverse-KL gradient stays at cos(∇KL_rev, ∇KL_fwd)."""
    last = curve["rows"][-1]
    assert last["dpo_cos_forward"] > 0.99
    assert last["dpo_cos_reverse"] < 0.8
    assert last["dpo_cos_reverse"] == pytest.approx(curve["cos_reverse_forward"], abs=0.02)
    assert last["exo_cos_reverse"] - last["dpo_cos_reverse"] > 0.2


def test_exo_value_approaches_reverse_kl(curve):
    """Not only the gradient: E[L_exo] → KL(π_θ^{β_π} ‖ π*) too (the group softmax's normaliser concentrates)."""
    ratio = [row["exo_loss"] / curve["reverse_kl"] for row in curve["rows"]]
    assert abs(ratio[-1] - 1) < 0.03
    assert ratio[0] < 0.6  # K = 2 sees a much smaller divergence


def test_sampled_gradient_is_unbiased_at_k2():
    """Slow reference for the Monte-Carlo estimator: at K = 2 enumerate all n² ordered pairs weighted by
    π_sft(i) π_sft(j) to get E[∇L_exo] exactly, and compare with the sampled estimate used above."""
    problem = ga.make_problem(n=64, seed=3)
    theta = problem.theta.clone().requires_grad_(True)
    i, j = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    idx = torch.stack([i.flatten(), j.flatten()], 1)  # (n², 2)
    weight = problem.logp_sft[idx].sum(-1).exp()  # (n²,) probability of drawing this pair
    losses = exo(
        theta.log_softmax(-1)[idx], problem.logp_sft[idx], reward_targets(problem.rewards[idx], 1.0), 1.0
    ).losses
    (exact,) = torch.autograd.grad((weight * losses).sum(), theta)
    _, sampled = ga.sampled_loss_grad(problem, "exo", k=2, groups=1 << 17, seed=0)
    assert ga.cosine(sampled, exact) > 0.995
    assert (sampled.norm() / exact.norm()).item() == pytest.approx(1.0, abs=0.03)


def test_exact_kl_gradients_match_finite_differences():
    """The reference gradients themselves: central differences of both KLs along random directions."""
    problem = ga.make_problem(n=32, seed=4, beta_pi=0.5, beta_r=2.0)
    g = torch.Generator().manual_seed(0)
    for direction in ("reverse", "forward"):
        _, grad = ga.exact_kl(problem, direction)
        for _ in range(3):
            v = torch.randn(32, generator=g, dtype=torch.float64)
            h = 1e-5
            plus = ga.Problem(problem.theta + h * v, problem.logp_sft, problem.rewards, 0.5, 2.0)
            minus = ga.Problem(problem.theta - h * v, problem.logp_sft, problem.rewards, 0.5, 2.0)
            fd = (ga.exact_kl(plus, direction)[0] - ga.exact_kl(minus, direction)[0]) / (2 * h)
            assert (grad @ v).item() == pytest.approx(fd, rel=1e-6, abs=1e-9)


def test_pi_beta_and_pi_star_definitions():
    """β_π = 1 ⇒ π_θ^{β_π} = π_θ; β_π → 0 ⇒ π_sft; π* tilts π_sft by exp(r/β_r) — checked on 3 outcomes by hand:
    π_sft = [½, ¼, ¼], r = [0, log 2, 0], β_r = 1 ⇒ π* ∝ [½, ½, ¼] = [0.4, 0.4, 0.2]."""
    logp_sft = torch.log(torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64))
    rewards = torch.tensor([0.0, torch.log(torch.tensor(2.0)).item(), 0.0], dtype=torch.float64)
    theta = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    p1 = ga.Problem(theta, logp_sft, rewards, 1.0, 1.0)
    torch.testing.assert_close(p1.log_pi_beta(theta), theta.log_softmax(-1))
    p0 = ga.Problem(theta, logp_sft, rewards, 1e-12, 1.0)
    torch.testing.assert_close(p0.log_pi_beta(theta), logp_sft)
    torch.testing.assert_close(p1.log_pi_star().exp(), torch.tensor([0.4, 0.4, 0.2], dtype=torch.float64))
