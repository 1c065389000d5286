"""RLOO (``get_loss("rloo")``): REINFORCE with a leave-one-out baseline on the KL-shaped reward.

``A_i = R_i − mean_{j≠i} R_j``, ``L = −(1/n) Σ_i A_i log π_θ(y_i)`` with ``R`` = ``online_targets(...).shaped_rewards``.
"""

from __future__ import annotations

import pytest
import torch

from exoalign.exact.metrics import kl, objective, optimum_logps
from exoalign.exact.problem import SeqPolicy, enumerate_logps
from exoalign.losses import exo, get_loss, loss_info, online_targets, rloo

D = torch.float64


def _t(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=D)


def test_rloo_golden_value_and_gradient():
    """r = [1, 2, 0], log μ = log π_θ = [−1, −2, −3], log π_sft = [−1.5, −1, −3], β_π = ½, β_r = 2 (β = 1).

    R = r − β (log μ − log π_sft) = [1 − 0.5, 2 + 1, 0] = [0.5, 3, 0]
    A = R − mean of the others = [0.5 − 1.5, 3 − 0.25, 0 − 1.75] = [−1, 2.75, −1.75]
    L = −(1/3) Σ A_i log π_i = −(1/3)(1 − 5.5 + 5.25) = −0.25;   ∂L/∂log π_i = −A_i/3 = [1/3, −11/12, 7/12]
    """
    r, mu, sft = _t([1.0, 2.0, 0.0]), _t([-1.0, -2.0, -3.0]), _t([-1.5, -1.0, -3.0])
    tg = online_targets(r, mu, sft, 0.5, 2.0)
    pol = mu.clone().requires_grad_(True)
    out = get_loss("rloo")(pol, None, tg.target_logprobs, 0.5, shaped_rewards=tg.shaped_rewards)
    assert out.losses.item() == pytest.approx(-0.25)
    torch.testing.assert_close(out.rewards, _t([-1.0, 2.75, -1.75]))
    (grad,) = torch.autograd.grad(out.losses.sum(), pol)
    torch.testing.assert_close(grad, _t([1 / 3, -11 / 12, 7 / 12]))
    assert out.metrics["rloo/shaped_reward"].item() == pytest.approx(3.5 / 3)
    assert out.metrics["rewards/chosen"].item() == pytest.approx(2.75)  # best by target: y_2


def test_rloo_registry_entry():
    info = loss_info("rloo")
    assert get_loss("rloo") is rloo and info.online_only and info.listwise and not info.needs_ref
    assert info.params == ["shaped_rewards"]
    assert not any(loss_info(n).online_only for n in ("exo", "dpo", "ipo"))


def test_rloo_masking_single_completion_and_shift_invariance():
    """Padding never read; a group of one has no baseline (loss 0, no gradient); a constant added to a
    group's rewards changes nothing (the baseline absorbs it)."""
    g = torch.Generator().manual_seed(0)
    pol = torch.randn(3, 4, generator=g, dtype=D).requires_grad_(True)
    r = torch.randn(3, 4, generator=g, dtype=D)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    nan_r = r.masked_fill(~mask, float("nan"))
    out = rloo(pol, None, r, 1.0, mask, shaped_rewards=nan_r)
    (grad,) = torch.autograd.grad(out.losses.sum(), pol)
    assert torch.isfinite(out.losses).all() and out.losses[2].item() == 0.0
    assert (grad[~mask] == 0).all() and (grad[2] == 0).all()
    shifted = rloo(pol, None, r, 1.0, mask, shaped_rewards=nan_r + _t([5.0], [-3.0], [1.0]).expand(3, 4))
    (grad2,) = torch.autograd.grad(shifted.losses.sum(), pol)
    torch.testing.assert_close(grad2, grad)
    # masking equals slicing
    part = rloo(pol[1:2, :2], None, r[1:2, :2], 1.0, shaped_rewards=r[1:2, :2])
    torch.testing.assert_close(out.losses[1:2], part.losses)


def test_rloo_is_online_exo_rescaled_at_one_use_per_sample():
    """With μ = π_θ and β_π = 1 EXO's p is uniform and ∇L_exo = −(1/K) Σ (R_i − R̄)/β ∇log π_i, while
    A_i = K/(K−1) (R_i − R̄): ∇L_rloo = β K/(K−1) ∇L_exo exactly, sample by sample."""
    g = torch.Generator().manual_seed(1)
    B, K, beta = 5, 4, 0.5
    pol = torch.randn(B, K, generator=g, dtype=D).requires_grad_(True)
    sft, r = torch.randn(B, K, generator=g, dtype=D), torch.randn(B, K, generator=g, dtype=D)
    tg = online_targets(r, pol.detach(), sft, 1.0, beta)
    (g_exo,) = torch.autograd.grad(exo(pol, tg.ref_logps, tg.target_logprobs, 1.0).losses.sum(), pol)
    (g_rloo,) = torch.autograd.grad(rloo(pol, None, tg.target_logprobs, 1.0, shaped_rewards=tg.shaped_rewards)
                                    .losses.sum(), pol)
    torch.testing.assert_close(g_rloo, beta * K / (K - 1) * g_exo)


def test_rloo_expected_gradient_is_the_exact_rl_gradient():
    """On 81 sequences with GRU policies: E[∇L_rloo] = −∇_θ J_β(π_θ) = β ∇ KL(π_θ ‖ π*_β) (unbiased at K = 4)."""
    torch.manual_seed(0)
    sft_pol, pol = SeqPolicy(3, 4, 1, hidden=5, embed=4).double(), SeqPolicy(3, 4, 1, hidden=5, embed=4).double()
    with torch.no_grad():
        for m in (sft_pol, pol):
            m.head.weight.mul_(3.0)
        sft = enumerate_logps(sft_pol, torch.arange(1))  # (1, 81)
    rewards = 2.0 * torch.rand(sft.shape, generator=torch.Generator().manual_seed(0), dtype=D)
    beta, k, groups = 0.5, 4, 16384
    params = list(pol.parameters())
    logp = enumerate_logps(pol, torch.arange(1))
    exact = torch.autograd.grad(-objective(logp, sft, rewards, beta).sum(), params, retain_graph=True)
    exact = torch.cat([e.flatten() for e in exact])
    kl_grad = torch.autograd.grad(kl(logp, optimum_logps(sft, rewards, beta)).sum(), params, retain_graph=True)
    torch.testing.assert_close(exact, beta * torch.cat([e.flatten() for e in kl_grad]))
    idx = torch.multinomial(logp[0].detach().exp(), groups * k, replacement=True,
                            generator=torch.Generator().manual_seed(1)).view(groups, k)
    lp = logp[0][idx]  # (G, K)
    tg = online_targets(rewards[0][idx], lp.detach(), sft[0][idx], 1.0, beta)
    est = torch.autograd.grad(rloo(lp, None, tg.target_logprobs, 1.0, shaped_rewards=tg.shaped_rewards)
                              .losses.mean(), params)
    est = torch.cat([e.flatten() for e in est])
    assert float(est @ exact / (est.norm() * exact.norm())) > 0.99
    assert (est.norm() / exact.norm()).item() == pytest.approx(1.0, abs=0.05)
