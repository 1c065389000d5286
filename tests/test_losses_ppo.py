"""PPO (``get_loss("ppo")``): the clipped surrogate on the KL-shaped reward with RLOO's leave-one-out advantage.

``A_i = R_i − mean_{j≠i} R_j``, ``ρ_i = π_θ(y_i)/π_t(y_i)``, ``L = −(1/n) Σ_i min(ρ_i A_i, clip(ρ_i, 1 ± c) A_i)``.
"""

from __future__ import annotations

import math

import pytest
import torch
from numerics import assert_close_scaled, rel_tol

from exoalign.errors import ConfigError
from exoalign.losses import get_loss, loss_info, online_targets, ppo, rloo

D = torch.float64


def _t(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=D)


def test_ppo_golden_value_gradient_and_metrics():
    """Two groups, c = 0.2; the second has a padded third slot (NaN, never read).

    Group 1: R = [1, 2, 4], A = R − mean of the others = [1 − 3, 2 − 2.5, 4 − 1.5] = [−2, −0.5, 2.5];
    ρ = [1.1, 1.5, 0.5]:
      y_1: ρ inside [0.8, 1.2]: min(−2.2, −2.2) = −2.2, ∂/∂log π = ρA = −2.2
      y_2: A < 0, ρ > 1.2: min(1.5·−0.5, 1.2·−0.5) = min(−0.75, −0.6) = −0.75 (unclipped), ∂ = −0.75
      y_3: A > 0, ρ < 0.8: min(0.5·2.5, 0.8·2.5) = min(1.25, 2.0) = 1.25 (unclipped), ∂ = 1.25
      L_1 = −(1/3)(−2.2 − 0.75 + 1.25) = 1.7/3;   ∂L_1/∂log π = −(1/3)[−2.2, −0.75, 1.25] = [11/15, 1/4, −5/12]
    Group 2: R = [0, 3], A = [−3, 3], ρ = [0.5, 2]:
      y_1: A < 0, ρ < 0.8: min(−1.5, 0.8·−3 = −2.4) = −2.4 (clipped: no gradient)
      y_2: A > 0, ρ > 1.2: min(6, 1.2·3 = 3.6) = 3.6 (clipped: no gradient)
      L_2 = −(1/2)(−2.4 + 3.6) = −0.6;   ∂L_2/∂log π = [0, 0, 0]
    Metrics over the 5 valid completions: clip_frac = 2/5, mean ratio = (1.1 + 1.5 + 0.5 + 0.5 + 2)/5 = 1.12,
    mean shaped reward = (1 + 2 + 4 + 0 + 3)/5 = 2.
    """
    nan = float("nan")
    old = _t([-1.0, -2.0, -3.0], [-4.0, -5.0, nan])
    rho = _t([1.1, 1.5, 0.5], [0.5, 2.0, 1.0])
    pol = (old + rho.log()).requires_grad_(True)
    shaped = _t([1.0, 2.0, 4.0], [0.0, 3.0, nan])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    out = get_loss("ppo")(pol, None, shaped, 1.0, mask, shaped_rewards=shaped, sampler_logps=old, clip=0.2)
    # float64 throughout; the largest intermediate is ~6: 1e-12 is thousands of ulps of headroom
    torch.testing.assert_close(out.losses, torch.tensor([1.7 / 3, -0.6], dtype=D), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.rewards, _t([-2.0, -0.5, 2.5], [-3.0, 3.0, 0.0]), rtol=0, atol=1e-12)
    (grad,) = torch.autograd.grad(out.losses.sum(), pol)
    torch.testing.assert_close(grad, _t([11 / 15, 1 / 4, -5 / 12], [0.0, 0.0, 0.0]), rtol=0, atol=1e-12)
    assert out.metrics["ppo/clip_frac"].item() == pytest.approx(0.4)
    assert out.metrics["ppo/ratio"].item() == pytest.approx(1.12)
    assert out.metrics["ppo/shaped_reward"].item() == pytest.approx(2.0)


def test_ppo_registry_entry_and_clip_validation():
    info = loss_info("ppo")
    assert get_loss("ppo") is ppo and info.online_only and info.listwise and not info.needs_ref
    assert info.params == ["shaped_rewards", "sampler_logps", "clip"]
    x = torch.zeros(1, 2, dtype=D)
    for bad in (0.0, 1.0, -0.1, True):
        with pytest.raises(ConfigError, match="clip"):
            ppo(x, None, x, 1.0, shaped_rewards=x, sampler_logps=x, clip=bad)


@pytest.mark.parametrize("beta_pi", [1.0, 0.5])
def test_ppo_gradient_is_rloos_at_a_samples_first_use(beta_pi):
    """At the first use of a round's samples π_θ = π_t, so ρ = 1: nothing is clipped, ∇ρ_i = ∇log π_θ(y_i) and
    ``∇L_ppo = −(1/n) Σ A_i ∇log π_θ(y_i) = ∇L_rloo``, group by group, with padded slots and a group of one.
    The loss value is −(1/n) Σ_i A_i = 0 (leave-one-out advantages sum to 0)."""
    g = torch.Generator().manual_seed(3)
    B, K, beta_r = 6, 5, 0.7
    pol = (-20 * torch.rand(B, K, generator=g, dtype=D)).requires_grad_(True)
    sft, r = -20 * torch.rand(B, K, generator=g, dtype=D), torch.randn(B, K, generator=g, dtype=D)
    mask = torch.ones(B, K, dtype=torch.bool)
    mask[1, 3:] = False
    mask[2, 1:] = False
    tg = online_targets(r, pol.detach(), sft, beta_pi, beta_r, mask)
    out = ppo(pol, None, tg.target_logprobs, beta_pi, mask, shaped_rewards=tg.shaped_rewards,
              sampler_logps=pol.detach())
    (g_ppo,) = torch.autograd.grad(out.losses.sum(), pol)
    (g_rloo,) = torch.autograd.grad(rloo(pol, None, tg.target_logprobs, beta_pi, mask,
                                         shaped_rewards=tg.shaped_rewards).losses.sum(), pol)
    # ρ = exp(0) = 1 exactly; the only rounding is the advantage's K-term sums, in float64
    assert_close_scaled(g_ppo, g_rloo, rel_tol(D, K))
    assert out.metrics["ppo/clip_frac"].item() == 0.0 and out.metrics["ppo/ratio"].item() == 1.0
    assert_close_scaled(out.losses, torch.zeros(B, dtype=D), rel_tol(D, K), scale=float(tg.shaped_rewards.abs().max()))


@pytest.mark.parametrize("adv_sign", [1.0, -1.0])
def test_clipping_zeroes_the_gradient_exactly_where_the_ratio_has_left_the_range(adv_sign):
    """One pair per ratio ρ on a grid across [0.5, 1.5]: R = ±[1, 0] so A = ±[1, −1]. For the first completion
    the gradient is −ρA/2 while the clip is inactive, and exactly 0 once ρ has left [1 − c, 1 + c] in A's
    direction (A > 0: ρ > 1 + c; A < 0: ρ < 1 − c); in the other direction it stays −ρA/2 (unclipped)."""
    c = 0.2
    rho = torch.linspace(0.5, 1.5, 41, dtype=D)  # includes values inside, below and above [0.8, 1.2]
    n = len(rho)
    old = torch.full((n, 2), -3.0, dtype=D)
    pol = (old + torch.stack([rho.log(), torch.zeros(n, dtype=D)], 1)).requires_grad_(True)  # (n, 2)
    shaped = adv_sign * torch.tensor([1.0, 0.0], dtype=D).expand(n, 2)
    out = ppo(pol, None, shaped, 1.0, shaped_rewards=shaped, sampler_logps=old, clip=c)
    (grad,) = torch.autograd.grad(out.losses.sum(), pol)
    a = adv_sign  # A of the first completion
    zeroed = (rho > 1 + c) if a > 0 else (rho < 1 - c)
    expected = torch.where(zeroed, torch.zeros_like(rho), -rho * a / 2)
    torch.testing.assert_close(grad[:, 0], expected, rtol=0, atol=1e-14)  # float64, values ≤ 0.75
    assert (grad[zeroed, 0] == 0).all() and (grad[~zeroed, 0] != 0).all()
    assert out.metrics["ppo/clip_frac"].item() == pytest.approx(zeroed.sum().item() / (2 * n))


def test_ppo_masking_equals_slicing():
    """A batch of groups with NaN padding gives each group's loss and gradient as the group alone, unpadded."""
    g = torch.Generator().manual_seed(7)
    B, K = 4, 5
    pol = (-10 * torch.rand(B, K, generator=g, dtype=D)).requires_grad_(True)
    old = pol.detach() + 0.3 * torch.randn(B, K, generator=g, dtype=D)  # ratios e^{±0.3·…}: some clipped
    r = torch.randn(B, K, generator=g, dtype=D)
    sizes = [5, 3, 2, 1]
    mask = torch.arange(K).expand(B, K) < torch.tensor(sizes).unsqueeze(1)  # (B, K)
    nan = lambda x: x.masked_fill(~mask, float("nan"))  # noqa: E731
    out = ppo(pol, None, nan(r), 1.0, mask, shaped_rewards=nan(r), sampler_logps=nan(old))
    (grad,) = torch.autograd.grad(out.losses.sum(), pol)
    assert torch.isfinite(out.losses).all() and (grad[~mask] == 0).all()
    assert out.losses[3].item() == 0.0 and (grad[3] == 0).all()  # a group of one has no baseline
    for b, k in enumerate(sizes):
        p = pol[b : b + 1, :k].detach().requires_grad_(True)
        alone = ppo(p, None, r[b : b + 1, :k], 1.0, shaped_rewards=r[b : b + 1, :k], sampler_logps=old[b : b + 1, :k])
        (g_alone,) = torch.autograd.grad(alone.losses.sum(), p)
        torch.testing.assert_close(out.losses[b : b + 1], alone.losses, rtol=0, atol=0)
        torch.testing.assert_close(grad[b : b + 1, :k], g_alone, rtol=0, atol=0)


def test_ppo_is_an_objective_for_reuse_where_rloo_is_not():
    """Reused samples: with the policy moved (ρ ≠ 1) PPO's gradient is the importance-weighted one, ρ_i A_i per
    completion (unclipped range), while RLOO keeps using A_i as if nothing had moved."""
    old = _t([-2.0, -2.0, -2.0])
    pol = (old + _t([math.log(1.1), math.log(0.9), 0.0])).requires_grad_(True)
    shaped = _t([1.0, 0.0, -1.0])  # A = [1.5, 0, −1.5]
    out = ppo(pol, None, shaped, 1.0, shaped_rewards=shaped, sampler_logps=old)
    (grad,) = torch.autograd.grad(out.losses.sum(), pol)
    torch.testing.assert_close(grad, _t([-1.1 * 1.5 / 3, 0.0, 1.5 / 3]), rtol=0, atol=1e-14)
