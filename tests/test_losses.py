"""The loss library against hand-derived values, TRL 1.16, the paper's identities and invariances.

Notation used in the docstrings: ``h = log π_θ − log π_sft`` per completion, ``z = β_π h``,
``p = softmax(z)`` over the group, ``q`` the target distribution, margin ``Δh = h_w − h_l``.
"""

from __future__ import annotations

import collections
import math
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from exoalign.errors import ConfigError
from exoalign.losses import (
    LOSSES,
    cdpo,
    dpo,
    exo,
    get_loss,
    hinge,
    ipo,
    loss_info,
    ppo,
    pref_targets,
    reward_targets,
    rloo,
    rpo,
    simpo,
)

D = torch.float64
ALL = sorted(LOSSES)
PAIRWISE = [n for n in ALL if not LOSSES[n].listwise]


def _t(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=D)


def _eq(x: torch.Tensor, expected, atol: float = 1e-12) -> None:
    """``x`` equals the (nested) list ``expected`` to ``atol``."""
    torch.testing.assert_close(x.detach().to(D), torch.tensor(expected, dtype=D), rtol=0, atol=atol)


def _call(name: str, pol, ref, tgt, beta, mask=None, lengths=None, **kw):
    """Call loss ``name`` with the extra inputs it needs (lengths default to 1 token each)."""
    if LOSSES[name].needs_lengths:
        kw["lengths"] = torch.ones_like(pol, dtype=torch.long) if lengths is None else lengths
    if LOSSES[name].online_only:
        kw.setdefault("shaped_rewards", tgt)  # rloo, ppo: the log-targets serve as (shaped) rewards
    if "sampler_logps" in LOSSES[name].params:  # ppo: the sampler a little off π_θ, ratios e^{±0.3}, some clipped
        x = pol.detach().double()  # offsets a function of the value, so permuting a group permutes them too
        kw.setdefault("sampler_logps", x + 0.3 * torch.cos(x))
    return get_loss(name)(pol, ref, tgt, beta, mask, **kw)


# ------------------------------------------------------------------------------------ golden values
def test_exo_pref_zero_margin_golden():
    """EXO-pref at zero margin, ε = 1e-3.

    h_w = h_l ⇒ p = [½, ½], q = [0.999, 0.001]:
    L = ½ log(½/0.999) + ½ log(½/0.001) = log ½ − ½ log(0.999 · 0.001) = 2.7612307090979…

    Gradient: with m = z_w − z_l, p_w = σ(m), dL/dp_w = log(p_w/q_w) − log(p_l/q_l) = log(q_l/q_w) at p = ½,
    dp_w/dm = ¼, so dL/dh_w = β_π · ¼ · log(0.001/0.999) = β_π · (−1.7266886946…), dL/dh_l = −dL/dh_w.
    """
    beta = 0.1
    pol = _t([-7.0, -3.0], [-2.5, -9.0]).requires_grad_(True)
    ref = pol.detach().clone()  # h = 0 in both groups, whatever the log-probs are
    out = exo(pol, ref, pref_targets(2, 1e-3, dtype=D), beta)
    assert out.losses.tolist() == pytest.approx([2.761230709097915] * 2, abs=1e-12)
    out.losses.sum().backward()
    g = beta * 0.25 * math.log(1e-3 / 0.999)
    _eq(pol.grad, [[g, -g]] * 2)
    assert g == pytest.approx(0.1 * -1.7266886946621385)


def test_dpo_zero_margin_is_log2_for_any_eps():
    """DPO at zero margin: p = [½, ½] ⇒ L = −(1−ε) log ½ − ε log ½ = log 2 whatever ε.

    dL/dz_i = p_i − q_i ⇒ dL/dh_w = β_π (½ − (1 − ε)) = β_π (ε − ½).
    """
    beta = 0.5
    for eps in (1e-3, 0.1, 0.3):
        pol = _t([-4.0, -6.0]).requires_grad_(True)
        out = dpo(pol, pol.detach(), pref_targets(1, eps, dtype=D), beta)
        assert out.losses.item() == pytest.approx(math.log(2), abs=1e-12)
        out.losses.sum().backward()
        _eq(pol.grad, [[beta * (eps - 0.5), -beta * (eps - 0.5)]])


def test_k3_reward_targets_golden():
    """A K = 3 group with reward targets, computed by hand.

    β_π = ½ and h = 2 log[2, 1, 1] + c ⇒ z = log[2, 1, 1] + c/2 ⇒ p = [½, ¼, ¼].
    β_r = 0.1 and r = 0.1 log[1, 1, 2] + 3 ⇒ r/β_r = log[1, 1, 2] + 30 ⇒ q = [¼, ¼, ½].

    EXO = Σ p log(p/q) = ½ log 2 + ¼ log 1 + ¼ log ½ = ¼ log 2 = 0.17328679…
    DPO = −Σ q log p = ¼ log 2 + ¼ log 4 + ½ log 4 = 7/4 log 2 = 1.21300756…
    Gradients w.r.t. z: EXO: p_i (log(p_i/q_i) − KL) = [⅜, −1/16, −5/16] log 2; DPO: p − q = [¼, 0, −¼].
    w.r.t. the policy log-probs multiply by β_π = ½.
    """
    ln2 = math.log(2)
    ref = _t([-10.0, -11.0, -12.0])
    h = 2 * torch.log(_t([2.0, 1.0, 1.0])) + 0.7
    rewards = 0.1 * torch.log(_t([1.0, 1.0, 2.0])) + 3.0
    tgt = reward_targets(rewards, 0.1)
    _eq(tgt.exp(), [[0.25, 0.25, 0.5]])

    pol = (ref + h).requires_grad_(True)
    out = exo(pol, ref, tgt, 0.5)
    assert out.losses.item() == pytest.approx(ln2 / 4, abs=1e-12)
    out.losses.sum().backward()
    _eq(pol.grad, [[0.5 * ln2 * v for v in (3 / 8, -1 / 16, -5 / 16)]])
    _eq(out.rewards, (0.5 * h).tolist())

    pol = (ref + h).requires_grad_(True)
    out = dpo(pol, ref, tgt, 0.5)
    assert out.losses.item() == pytest.approx(7 / 4 * ln2, abs=1e-12)
    out.losses.sum().backward()
    _eq(pol.grad, [[0.125, 0.0, -0.125]])


def test_pairwise_golden_values():
    """IPO, hinge, cdpo, SimPO and RPO on hand-computed pairs (column 0 chosen).

    * IPO, β = ½ (target margin 1/(2β) = 1): Δh = 3 ⇒ (3 − 1)² = 4; Δh = 0 ⇒ 1.
    * hinge, β = ½: Δh = 1 ⇒ 1 − ½ = ½; Δh = 3 ⇒ max(0, −½) = 0 with zero gradient.
    * cdpo, ε = 0.1: z = 0 ⇒ log 2; z = log 3 ⇒ σ(z) = ¾ ⇒ −0.9 log ¾ − 0.1 log ¼ = 0.39754330…
    * SimPO, β = 2, γ = ½: log π = [−6, −12], |y| = [3, 4] ⇒ normalised [−2, −3], margin 1
      ⇒ −log σ(2 − ½) = log(1 + e^{−1.5}) = 0.20141327…
    * RPO, β = ½, α = ½: log π = [−4, −6], log π_sft = [−5, −5] ⇒ Δh = 2, z = 1 ⇒ −log σ(1) = 0.31326168…;
      NLL of the chosen = 4 (sum) or 4/2 = 2 (|y_w| = 2) ⇒ 0.31326 + 2 = 2.31326…, 0.31326 + 1 = 1.31326….
    """
    pt = pref_targets(2, 1e-3, dtype=D)
    ref = _t([-5.0, -5.0], [-5.0, -5.0])

    assert ipo(ref + _t([3.0, 0.0], [1.0, 1.0]), ref, pt, 0.5).losses.tolist() == pytest.approx([4.0, 1.0])

    pol = (ref + _t([1.0, 0.0], [3.0, 0.0])).requires_grad_(True)
    out = hinge(pol, ref, pt, 0.5)
    assert out.losses.tolist() == pytest.approx([0.5, 0.0])
    out.losses.sum().backward()
    _eq(pol.grad, [[-0.5, 0.5], [0.0, 0.0]])

    pol = ref + _t([0.0, 0.0], [math.log(3), 0.0])
    assert cdpo(pol, ref, pt, 1.0, label_smoothing=0.1).losses.tolist() == pytest.approx(
        [math.log(2), 0.39754330131859184], abs=1e-12
    )

    out = simpo(
        _t([-6.0, -12.0]),
        None,
        pref_targets(1, 1e-3, dtype=D),
        2.0,
        lengths=torch.tensor([[3, 4]]),
        gamma=0.5,
    )
    assert out.losses.item() == pytest.approx(0.2014132779827524, abs=1e-12)
    _eq(out.rewards, [[-4.0, -6.0]])

    pol, r1 = _t([-4.0, -6.0]), pref_targets(1, 1e-3, dtype=D)
    assert rpo(pol, _t([-5.0, -5.0]), r1, 0.5, alpha=0.5).losses.item() == pytest.approx(
        0.31326168751822286 + 2
    )
    out = rpo(pol, _t([-5.0, -5.0]), r1, 0.5, lengths=torch.tensor([[2, 7]]), alpha=0.5)
    assert out.losses.item() == pytest.approx(0.31326168751822286 + 1)
    assert out.metrics["nll"].item() == pytest.approx(2.0)


def test_metrics_from_best_and_worst():
    """rewards/* read the best and worst completion by target: here chosen β h = 0.4, rejected −0.2."""
    ref = _t([-5.0, -5.0, -5.0], [-1.0, -1.0, -1.0])
    pol = ref + _t([4.0, 1.0, -2.0], [-1.0, 0.0, 3.0])  # second group: best (index 2) has the highest h
    tgt = reward_targets(_t([3.0, 2.0, 1.0], [0.0, 0.5, 1.0]), 1.0)
    m = exo(pol, ref, tgt, 0.1).metrics
    assert m["rewards/chosen"].item() == pytest.approx((0.4 + 0.3) / 2)
    assert m["rewards/rejected"].item() == pytest.approx((-0.2 - 0.1) / 2)
    assert m["rewards/margins"].item() == pytest.approx((0.6 + 0.4) / 2)
    assert m["rewards/accuracies"].item() == 1.0


# ---------------------------------------------------------------------------- against TRL 1.16
def _trl_loss(loss_type: str, pol: torch.Tensor, ref: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    """Run TRL 1.16's own ``DPOTrainer._compute_loss`` on given sequence log-probs, without a model.

    ``_compute_loss`` reads sequence log-probs from ``model(...).log_probs`` (per token, summed over the
    completion) and the reference from ``inputs["ref_*_logps"]``; everything else it touches is logging.
    A stand-in ``self`` with the attributes it reads and a stand-in model whose per-token log-probs put
    the whole sequence log-prob on one token let TRL's loss code run unchanged, so this compares against
    TRL's formula itself rather than a re-typed copy of it. Returns TRL's batch-mean loss.
    """
    from trl.trainer.dpo_trainer import DPOTrainer

    n, t = pol.shape[0], 3

    class _Accelerator:
        device = torch.device("cpu")

        def gather_for_metrics(self, x):
            return x

        gather = gather_for_metrics

    fake_self = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=_Accelerator(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=eps,
        use_weighting=False,
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    logps = torch.cat([pol[:, 0], pol[:, 1]])  # (2N,): TRL's batch is [chosen..., rejected...]

    def model(**_):
        per_token = torch.cat(
            [logps[:, None], torch.zeros(2 * n, t - 2, dtype=logps.dtype)], dim=1
        )  # (2N, T-1)
        zeros = torch.zeros(2 * n, t - 1)
        return types.SimpleNamespace(
            log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool()
        )

    completion = torch.tensor([[0, 1, 0]] * (2 * n))  # one completion token: IPO's length normalisation is /1
    inputs = {
        "input_ids": torch.ones(2 * n, t, dtype=torch.long),
        "attention_mask": torch.ones(2 * n, t, dtype=torch.long),
        "completion_mask": completion,
        "ref_chosen_logps": ref[:, 0],
        "ref_rejected_logps": ref[:, 1],
    }
    return DPOTrainer._compute_loss(fake_self, model, inputs, return_outputs=False)


def _ours(trl_type: str, pol, ref, pt, beta: float, eps: float) -> torch.Tensor:
    """Our loss that corresponds to TRL's ``trl_type``; for ``sigmoid`` remove the ε z term (see below)."""
    if trl_type == "exo_pair":
        return exo(pol, ref, pt, beta).losses
    if trl_type == "sigmoid":
        z = beta * ((pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1]))
        return dpo(pol, ref, pt, beta).losses - eps * z
    return {"ipo": ipo, "hinge": hinge}[trl_type](pol, ref, pt, beta).losses


def test_against_trl_losses():
    """exo ≡ TRL ``exo_pair``; dpo(ε) − ε z ≡ TRL ``sigmoid``; ipo ≡ ``ipo``; hinge ≡ ``hinge`` — values and
    gradients, on margins from −30 to 30 and two (β, ε) settings."""
    import trl

    assert trl.__version__.startswith("1.16"), "the comparison was written against TRL 1.16's dpo_trainer"
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(16, 2, generator=g, dtype=D) * 5 - 20
    pol0 = ref + torch.linspace(-30, 30, 16, dtype=D)[:, None] * torch.tensor([0.5, -0.5], dtype=D)
    for beta, eps in ((0.1, 1e-3), (0.5, 0.2)):
        pt = pref_targets(16, eps, dtype=D)
        for trl_type in ("exo_pair", "sigmoid", "ipo", "hinge"):
            p1 = pol0.clone().requires_grad_(True)
            theirs = _trl_loss(trl_type, p1, ref, beta, eps)
            theirs.backward()
            p2 = pol0.clone().requires_grad_(True)
            mine = _ours(trl_type, p2, ref, pt, beta, eps).mean()
            mine.backward()
            # TRL builds ε as a float32 tensor, hence the 1e-6 tolerance on exo_pair
            assert mine.item() == pytest.approx(theirs.item(), rel=1e-6, abs=1e-6), trl_type
            torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-5, atol=1e-7, msg=trl_type)


def test_authors_log_targets_differ_by_a_constant():
    """The authors' code feeds log-targets (0, −10) unnormalised. Normalised they are
    ``log[σ(10), σ(−10)] = [0, −10] − log(1 + e^{−10})``, i.e. ``pref_targets(eps=σ(−10))``. Since Σ p = 1,
    Σ p (log p − t) changes by exactly the shift: L_authors − L_ours = −log(1 + e^{−10}) = −4.5398899e−5,
    and the gradients are identical."""
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(8, 2, generator=g, dtype=D)
    pol_a = (ref + 3 * torch.randn(8, 2, generator=g, dtype=D)).requires_grad_(True)
    pol_b = pol_a.detach().clone().requires_grad_(True)
    authors = exo(pol_a, ref, _t([0.0, -10.0]).expand(8, 2), 0.1).losses
    ours = exo(pol_b, ref, pref_targets(8, 1 / (1 + math.exp(10)), dtype=D), 0.1).losses
    torch.testing.assert_close(
        authors - ours, torch.full((8,), -4.539889921686465e-05, dtype=D), rtol=0, atol=1e-14
    )
    authors.sum().backward()
    ours.sum().backward()
    torch.testing.assert_close(pol_a.grad, pol_b.grad, rtol=0, atol=1e-15)


# ----------------------------------------------------------------------------- paper identities
def test_reward_targets_k2_equal_pref_targets():
    """K = 2 with rewards r: softmax(r/β_r) = [σ(Δr/β_r), σ(−Δr/β_r)] = pref targets with ε = σ(−Δr/β_r)."""
    g = torch.Generator().manual_seed(2)
    rewards = torch.stack(
        [torch.rand(6, generator=g, dtype=D) + 0.05, -torch.rand(6, generator=g, dtype=D)], 1
    )
    beta_r = 0.3
    ref = torch.randn(6, 2, generator=g, dtype=D)
    pol = ref + torch.randn(6, 2, generator=g, dtype=D)
    rw = reward_targets(rewards, beta_r)
    for i in range(6):
        eps = 1.0 / (1.0 + math.exp((rewards[i, 0] - rewards[i, 1]).item() / beta_r))
        pt = pref_targets(1, eps, dtype=D)
        torch.testing.assert_close(rw[i : i + 1], pt, rtol=0, atol=1e-14)
        for fn in (exo, dpo):
            a = fn(pol[i : i + 1], ref[i : i + 1], rw[i : i + 1], 0.7).losses
            b = fn(pol[i : i + 1], ref[i : i + 1], pt, 0.7).losses
            torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


@settings(max_examples=40, deadline=None)
@given(
    margin=st.floats(-200, 200, allow_nan=False),
    beta=st.floats(0.01, 2.0),
    eps=st.floats(1e-9, 0.49),
)
def test_dpo_pref_is_logsigmoid_plus_eps_margin(margin, beta, eps):
    """With q = [1−ε, ε], z = β Δh: −(1−ε) log σ(z) − ε log σ(−z) = −log σ(z) + ε (log σ(z) − log σ(−z))
    = −log σ(z) + ε z, because log σ(z) − log σ(−z) = z. So DPO-pref → −log σ(β Δh) as ε → 0 (error ε|z|),
    and cdpo(ε) equals DPO with pref targets at the same ε."""
    ref = _t([-3.0, -4.0])
    pol = ref + _t([margin, 0.0])
    z = beta * margin
    expect = -torch.nn.functional.logsigmoid(torch.tensor(z, dtype=D)).item() + eps * z
    pt = pref_targets(1, eps, dtype=D)
    assert dpo(pol, ref, pt, beta).losses.item() == pytest.approx(expect, rel=1e-12, abs=1e-12)
    assert cdpo(pol, ref, pt, beta, label_smoothing=eps).losses.item() == pytest.approx(
        expect, rel=1e-12, abs=1e-12
    )


def test_cdpo_equals_dpo_with_pref_targets_gradients():
    g = torch.Generator().manual_seed(3)
    ref = torch.randn(10, 2, generator=g, dtype=D)
    base = ref + 4 * torch.randn(10, 2, generator=g, dtype=D)
    pt = pref_targets(10, 0.15, dtype=D)
    a, b = base.clone().requires_grad_(True), base.clone().requires_grad_(True)
    la, lb = dpo(a, ref, pt, 0.3).losses, cdpo(b, ref, pt, 0.3, label_smoothing=0.15).losses
    torch.testing.assert_close(la, lb, rtol=0, atol=1e-13)
    la.sum().backward()
    lb.sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-13)


# ------------------------------------------------------------------------------------ invariances
def _random_groups(b: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ref = -20 + 5 * torch.randn(b, k, generator=g, dtype=D)
    pol = ref + 2 * torch.randn(b, k, generator=g, dtype=D)
    rewards = torch.randn(b, k, generator=g, dtype=D)
    lengths = torch.randint(1, 30, (b, k), generator=g)
    return pol, ref, rewards, lengths


@pytest.mark.parametrize("name", ALL)
def test_permuting_a_group_changes_nothing(name):
    """Reordering the completions of a group (with their rewards, lengths and mask) leaves each loss unchanged
    and permutes the implicit rewards the same way."""
    pol, ref, rewards, lengths = _random_groups(4, 6, seed=4)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1, 4:] = False
    tgt = reward_targets(rewards, 0.5, mask)
    base = _call(name, pol, ref, tgt, 0.2, mask, lengths)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(5))
    out = _call(name, pol[:, perm], ref[:, perm], tgt[:, perm], 0.2, mask[:, perm], lengths[:, perm])
    torch.testing.assert_close(out.losses, base.losses, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.rewards, base.rewards[:, perm])
    for key, value in base.metrics.items():
        torch.testing.assert_close(out.metrics[key], value, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ALL)
def test_masking_equals_removing_with_mixed_group_sizes(name):
    """One batch holding groups of K = 6, 4, 3, 2: each group's loss and gradient equal those of the group
    computed alone without its padding; padding holds NaN (never read) and gets exactly zero gradient."""
    sizes = [6, 4, 3, 2]
    pol, ref, rewards, lengths = _random_groups(4, 6, seed=6)
    mask = torch.arange(6)[None, :] < torch.tensor(sizes)[:, None]  # (4, 6)
    nan = torch.tensor(float("nan"), dtype=D)
    pol, ref, rewards = (x.where(mask, nan) for x in (pol, ref, rewards))
    pol = pol.requires_grad_(True)
    batch = _call(name, pol, ref, reward_targets(rewards, 0.5, mask), 0.2, mask, lengths)
    batch.losses.sum().backward()
    assert torch.isfinite(batch.losses).all() and torch.isfinite(pol.grad).all()
    assert (pol.grad[~mask] == 0).all()
    assert (batch.rewards[~mask] == 0).all()
    for i, k in enumerate(sizes):
        p = pol.detach()[i : i + 1, :k].clone().requires_grad_(True)
        alone = _call(
            name,
            p,
            ref[i : i + 1, :k],
            reward_targets(rewards[i : i + 1, :k], 0.5),
            0.2,
            None,
            lengths[i : i + 1, :k],
        )
        alone.losses.sum().backward()
        torch.testing.assert_close(batch.losses[i : i + 1], alone.losses, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(pol.grad[i : i + 1, :k], p.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(batch.rewards[i : i + 1, :k], alone.rewards)


@pytest.mark.parametrize("name", ALL)
def test_groups_without_a_pair_give_zero(name):
    """A group with one valid completion or none has nothing to compare: loss exactly 0, no gradient."""
    pol, ref, rewards, lengths = _random_groups(3, 4, seed=7)
    mask = torch.tensor([[True, True, False, False], [True, False, False, False], [False] * 4])
    pol = pol.requires_grad_(True)
    out = _call(name, pol, ref, reward_targets(rewards, 1.0, mask), 0.1, mask, lengths)
    out.losses.sum().backward()
    assert out.losses[0].item() != 0.0
    assert out.losses[1:].tolist() == [0.0, 0.0]
    assert (pol.grad[1:] == 0).all() and torch.isfinite(pol.grad).all()


def test_listwise_matches_slow_reference():
    """exo and dpo on random groups (K = 5) against a per-group float64 loop over the definitions."""
    pol, ref, rewards, _ = _random_groups(6, 5, seed=8)
    beta_pi, beta_r = 0.4, 0.25
    tgt = reward_targets(rewards, beta_r)
    for i in range(6):
        z = [beta_pi * (pol[i, j] - ref[i, j]).item() for j in range(5)]
        r = [rewards[i, j].item() / beta_r for j in range(5)]
        zs, rs = sum(math.exp(v) for v in z), sum(math.exp(v) for v in r)
        p = [math.exp(v) / zs for v in z]
        q = [math.exp(v) / rs for v in r]
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        ce = -sum(qi * math.log(pi) for pi, qi in zip(p, q))
        assert exo(pol, ref, tgt, beta_pi).losses[i].item() == pytest.approx(kl, rel=1e-12)
        assert dpo(pol, ref, tgt, beta_pi).losses[i].item() == pytest.approx(ce, rel=1e-12)


# ------------------------------------------------------------------------------------- stability
def test_extreme_margins_pref():
    """Margins of ±1e4 (β = 0.1 ⇒ z = ±1e3): limits computed by hand.

    EXO: p → [1, 0] gives KL → −log(1 − ε) = 1.0005e−3; p → [0, 1] gives −log ε = 6.9077553.
    DPO: −log σ(z) + ε z ⇒ z = 1e3 gives ε·1e3 = 1; z = −1e3 gives 1e3 − 1 = 999.
    """
    ref = _t([-50.0, -50.0], [-50.0, -50.0])
    pol = (ref + _t([1e4, -0.0], [-1e4, 0.0])).requires_grad_(True)
    pt = pref_targets(2, 1e-3, dtype=D)
    out = exo(pol, ref, pt, 0.1)
    assert out.losses.tolist() == pytest.approx([-math.log1p(-1e-3), -math.log(1e-3)], rel=1e-9)
    out.losses.sum().backward()
    assert torch.isfinite(pol.grad).all()
    assert dpo(pol, ref, pt, 0.1).losses.tolist() == pytest.approx([1.0, 999.0], rel=1e-9)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finite_for_huge_margins_k64_and_padding(name, dtype):
    """K = 64, log-ratios of order ±1e4, rewards of order ±1e4 with β_r = 0.1, -inf/NaN padding slots and a
    fully masked group: values, gradients and metrics stay finite in fp32 and bf16."""
    g = torch.Generator().manual_seed(9)
    b, k = 4, 64
    ref = (-1e3 + 10 * torch.randn(b, k, generator=g)).to(dtype)
    pol = (ref.float() + 1e4 * torch.randn(b, k, generator=g)).to(dtype)
    mask = torch.ones(b, k, dtype=torch.bool)
    mask[1, 10:] = False
    mask[2] = False
    pol = pol.masked_fill(~mask, float("-inf")).requires_grad_(True)
    ref = ref.masked_fill(~mask, float("nan"))
    tgt = reward_targets((1e4 * torch.randn(b, k, generator=g)).to(dtype), 0.1, mask)
    out = _call(name, pol, ref, tgt, 0.1, mask, torch.randint(1, 100, (b, k), generator=g))
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all(), out.losses
    assert torch.isfinite(pol.grad).all() and pol.grad.dtype == dtype
    assert all(torch.isfinite(v).all() for v in out.metrics.values())
    assert out.losses[2].item() == 0.0


@pytest.mark.parametrize("name", ALL)
def test_bf16_inputs_are_computed_in_fp32(name):
    """bf16 log-probs give the float32 loss of the same (rounded) values: the group softmax is not done in bf16."""
    pol, ref, rewards, lengths = _random_groups(3, 5, seed=10)
    pol16, ref16 = pol.to(torch.bfloat16), ref.to(torch.bfloat16)
    tgt = reward_targets(rewards.float(), 0.5)
    a = _call(name, pol16, ref16, tgt, 0.2, None, lengths).losses
    b = _call(name, pol16.float(), ref16.float(), tgt, 0.2, None, lengths).losses
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------------- registry and targets
def test_registry_names_and_info():
    assert set(LOSSES) == {"exo", "dpo", "ipo", "cdpo", "simpo", "rpo", "hinge", "rloo", "ppo"}
    expected = {"exo": exo, "dpo": dpo, "ipo": ipo, "cdpo": cdpo, "simpo": simpo, "rpo": rpo, "hinge": hinge,
                "rloo": rloo, "ppo": ppo}
    for name, fn in expected.items():
        assert get_loss(name) is fn
        assert "https://" in fn.__doc__  # the paper is cited in every loss's docstring
    assert loss_info("simpo").needs_ref is False and loss_info("simpo").needs_lengths is True
    assert loss_info("exo").listwise and loss_info("dpo").listwise and not loss_info("ipo").listwise
    assert loss_info("simpo").params == ["lengths", "gamma"]
    assert loss_info("rpo").params == ["lengths", "alpha"]
    assert loss_info("cdpo").params == ["label_smoothing"]
    assert loss_info("exo").params == []


def test_unknown_loss_is_config_error():
    with pytest.raises(ConfigError) as e:
        get_loss("exo_pair")
    assert e.value.field == "loss.name"
    assert "exo" in e.value.fix and "hinge" in e.value.fix
    assert str(e.value).startswith("field 'loss.name': unknown loss 'exo_pair'.")


@pytest.mark.parametrize("eps", [0, 0.0, 0.5, 0.7, -1e-3, float("nan"), float("inf"), True, "0.1", None])
def test_pref_targets_rejects_eps_outside_open_interval(eps):
    with pytest.raises(ConfigError) as e:
        pref_targets(3, eps)
    assert e.value.field == "eps" and "1e-3" in e.value.fix


def test_cdpo_rejects_bad_label_smoothing():
    pol = _t([-1.0, -2.0])
    with pytest.raises(ConfigError) as e:
        cdpo(pol, pol, pref_targets(1, 0.1, dtype=D), 0.1, label_smoothing=0.5)
    assert e.value.field == "label_smoothing"


def test_pref_targets_values():
    t = pref_targets(3, 1e-3)
    assert t.shape == (3, 2) and t.dtype == torch.float32
    assert t[0].tolist() == pytest.approx([math.log(0.999), math.log(1e-3)], rel=1e-6)
    assert t.exp().sum(-1).tolist() == pytest.approx([1.0] * 3)


def test_reward_targets_masking_and_validation():
    """Padding rewards (NaN) are ignored; valid slots hold log_softmax(r/β_r) over the group alone."""
    rewards = _t([1.0, 2.0, float("nan")], [0.0, float("nan"), float("nan")])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    t = reward_targets(rewards, 0.5, mask)
    assert t[0, :2].tolist() == pytest.approx(
        [-math.log1p(math.exp(2)), -math.log1p(math.exp(-2))], rel=1e-12
    )
    assert t[1, 0].item() == 0.0
    assert (t[~mask] < -1e29).all()
    assert reward_targets(torch.tensor([[1, 3]]), 1.0).dtype == torch.float32  # integer rewards are fine
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError):
            reward_targets(rewards, bad, mask)
