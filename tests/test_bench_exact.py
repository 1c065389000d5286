"""Tests of the exact-optimum benchmark: enumeration, exact metrics, analytic best-of-N, ancestral sampling, the online
methods, the CLI's quick mode."""

from __future__ import annotations

import json
import math

import pytest
import torch

from exoalign.cli import main as cli_main
from exoalign.exact.metrics import (
    best_of_n_logps,
    exact_metrics,
    kl,
    objective,
    optimum_logps,
)
from exoalign.exact.problem import (
    SeqPolicy,
    SeqTaskSpec,
    all_sequences,
    build_task,
    enumerate_logps,
    seq_index,
    sequence_logps,
)
from exoalign.exact.train import sample_offline


def _random_policy(vocab: int = 3, length: int = 4, prompts: int = 2, seed: int = 0) -> SeqPolicy:
    torch.manual_seed(seed)
    pol = SeqPolicy(vocab, length, prompts, hidden=5, embed=4).double()
    with torch.no_grad():  # sharpen the random init so the distribution is far from uniform
        pol.head.weight.mul_(10.0)
        pol.head.bias.normal_(0.0, 2.0)
    return pol


def test_all_sequences_are_lexicographic_and_index_round_trips():
    seqs = all_sequences(3, 4)
    assert seqs.shape == (81, 4)
    assert seqs[0].tolist() == [0, 0, 0, 0] and seqs[5].tolist() == [0, 0, 1, 2] and seqs[-1].tolist() == [2, 2, 2, 2]
    assert torch.equal(seq_index(seqs, 3), torch.arange(81))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_enumeration_sums_to_one_and_matches_teacher_forcing(seed):
    pol = _random_policy(seed=seed)
    with torch.no_grad():
        table = enumerate_logps(pol, torch.arange(2))  # (2, 81)
        assert table.shape == (2, 81)
        torch.testing.assert_close(table.exp().sum(-1), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-12)
        seqs = all_sequences(3, 4)
        for x in range(2):
            tf = sequence_logps(pol, torch.full((81,), x), seqs)  # sum of token log-probs, one fused GRU pass
            torch.testing.assert_close(tf, table[x], rtol=0, atol=1e-10)
        # not a trivial distribution: the sharpened policy is far from uniform
        assert table.exp().max() > 3 / 81 and table.exp().min() < 0.3 / 81


def test_sft_target_is_a_distribution_and_reward_has_two_unequal_peaks():
    task = build_task(SeqTaskSpec(vocab=4, length=4, prompts=2, seed=3))
    torch.testing.assert_close(task.sft_probs.sum(-1), torch.ones(2, dtype=torch.float64))
    idx = seq_index(task.goals, 4)  # (P, 2)
    for x in range(2):
        assert task.rewards[x, idx[x, 0]].item() == pytest.approx(4.0)  # the high peak
        assert task.rewards[x, idx[x, 1]].item() == pytest.approx(2.0)  # the low peak, near the frequent mode
        assert task.rewards[x].max().item() == pytest.approx(4.0)


def _tables(seed: int, beta: float):
    """π_sft from a random GRU, a random reward, and π* — all [P, N] float64."""
    pol = _random_policy(seed=seed)
    with torch.no_grad():
        sft = enumerate_logps(pol, torch.arange(2))
    rewards = torch.rand(sft.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3
    return sft, rewards, optimum_logps(sft, rewards, beta)


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_optimum_beats_every_policy_and_the_gap_identity_holds(beta):
    sft, rewards, opt = _tables(0, beta)
    j_opt = objective(opt, sft, rewards, beta)  # (P,)
    # closed form: J(π*) = β log Z
    torch.testing.assert_close(j_opt, beta * torch.logsumexp(sft + rewards / beta, -1))
    others = [torch.log_softmax(torch.randn(sft.shape, generator=torch.Generator().manual_seed(s),
                                            dtype=torch.float64) * (1 + s % 4), -1) for s in range(12)]
    with torch.no_grad():
        others += [enumerate_logps(_random_policy(seed=100 + s), torch.arange(2)) for s in range(4)]
    others.append(torch.log_softmax(0.3 * sft + 0.7 * opt, -1))  # close to the optimum, still not it
    for pi in others:
        j = objective(pi, sft, rewards, beta)
        assert (j_opt > j).all()
        # J(π*) − J(π) = β KL(π ‖ π*)
        torch.testing.assert_close(j_opt - j, beta * kl(pi, opt), rtol=1e-9, atol=1e-9)


def test_kl_of_optimum_to_itself_is_zero_and_gap_anchors():
    beta = 0.5
    sft, rewards, opt = _tables(1, beta)
    assert kl(opt, opt).abs().max().item() == 0.0
    m_opt = exact_metrics(opt, sft, rewards, beta)
    assert m_opt["gap"] == pytest.approx(0.0, abs=1e-12)
    assert m_opt["kl_to_opt"] == pytest.approx(0.0, abs=1e-12) and m_opt["kl_from_opt"] == pytest.approx(0.0, abs=1e-12)
    m_sft = exact_metrics(sft, sft, rewards, beta)
    assert m_sft["gap"] == pytest.approx(1.0) and m_sft["kl_to_sft"] == pytest.approx(0.0, abs=1e-12)
    # gap = KL(π‖π*) / KL(π_sft‖π*) for any π
    mid = torch.log_softmax(0.5 * (sft + opt), -1)
    m = exact_metrics(mid, sft, rewards, beta)
    assert m["gap"] == pytest.approx(m["kl_to_opt"] / m_sft["kl_to_opt"], rel=1e-9)
    assert 0.0 < m["gap"] < 1.0


def test_best_of_n_analytic_matches_monte_carlo_with_ties():
    """Six outcomes, two of them tied in reward; best of 3 draws, ties broken uniformly at random."""
    p = torch.tensor([[0.3, 0.1, 0.2, 0.15, 0.05, 0.2]], dtype=torch.float64)
    r = torch.tensor([[0.0, 1.0, 1.0, 2.0, 3.0, 0.5]], dtype=torch.float64)
    n, draws = 3, 200_000
    analytic = best_of_n_logps(p.log(), r, n).exp()[0]
    torch.testing.assert_close(analytic.sum(), torch.tensor(1.0, dtype=torch.float64))
    gen = torch.Generator().manual_seed(0)
    samples = torch.multinomial(p[0], draws * n, replacement=True, generator=gen).view(draws, n)  # (D, n)
    # argmax of reward + tiny uniform noise = best with uniform tie-breaking (noise ≪ reward gaps)
    score = r[0][samples] + 1e-6 * torch.rand(draws, n, generator=gen, dtype=torch.float64)
    best = samples.gather(1, score.argmax(1, keepdim=True)).squeeze(1)
    empirical = torch.bincount(best, minlength=6).double() / draws
    se = (analytic * (1 - analytic) / draws).sqrt()
    assert ((empirical - analytic).abs() <= 5 * se + 1e-9).all(), (empirical, analytic)
    # hand check for the top outcome: 1 − (1 − 0.05)^3
    assert analytic[4].item() == pytest.approx(1 - 0.95**3)
    # best-of-1 is π_sft itself
    torch.testing.assert_close(best_of_n_logps(p.log(), r, 1).exp(), p)


def test_offline_pairs_follow_bradley_terry():
    sft = torch.log(torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    rewards = torch.tensor([[0.0, 0.3]], dtype=torch.float64)
    seqs = torch.tensor([[0], [1]])
    data = sample_offline(sft, rewards, seqs, 40_000, 0.5, torch.Generator().manual_seed(0))
    pr = data.rewards[0][data.pairs[0]]  # (M/2, 2) rewards of (chosen, rejected)
    mixed = pr[:, 0] != pr[:, 1]
    frac = (pr[mixed, 0] > pr[mixed, 1]).double().mean().item()
    expect = 1 / (1 + math.exp(-0.3 / 0.5))  # σ(Δr / β_r)
    assert frac == pytest.approx(expect, abs=4 * math.sqrt(expect * (1 - expect) / mixed.sum().item()))
    # cached reference log-probs are π_sft's
    torch.testing.assert_close(data.ref_logps, torch.full((1, 40_000), math.log(0.5)))


def test_exo_rw_gradient_tends_to_the_rl_gradient_with_beta_pi_one():
    """With β_π = 1 and many samples from π_sft, ∇ EXO ∥ ∇ KL(π_θ‖π*) (Ji et al. 2024, Thm 3.x)."""
    from exoalign.exact.toy import GaussianPolicy, ToySpec, toy_problem
    from exoalign.losses import get_loss, reward_targets

    spec = ToySpec()
    sft, rewards = toy_problem(spec)
    opt = optimum_logps(sft, rewards, spec.beta)
    pol = GaussianPolicy(spec.bins, 0.4, 0.15)  # a policy away from π_sft
    exact = torch.autograd.grad(kl(pol(), opt).sum(), [pol.mu, pol.log_sigma])
    ys = torch.multinomial(sft[0].exp(), 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    out = get_loss("exo")(pol()[0][ys].unsqueeze(0), sft[0][ys].unsqueeze(0),
                          reward_targets(rewards[0][ys].unsqueeze(0), spec.beta), 1.0)
    est = torch.autograd.grad(out.losses.sum(), [pol.mu, pol.log_sigma])
    a, b = torch.stack(exact), torch.stack(est)
    assert torch.dot(a, b) / (a.norm() * b.norm()) > 0.99


@pytest.mark.slow
def test_quick_mode_runs_through_the_cli_and_writes_the_schema(tmp_path):
    out = tmp_path / "exact"
    assert cli_main(["bench", "exact", "--quick", "--no-progress", "--seed", "0", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res) == {"config", "methods"}
    names = {"exo-pref", "dpo-pref", "ipo", "rl-exact", "sft", "optimum"}
    names |= {f"{m}-rw-k{k}" for m in ("exo", "dpo") for k in (2, 4, 8)}
    names |= {f"best-of-n-{n}" for n in res["config"]["best_of_n"]}
    online = {f"{m}-k{k}{r}" for m in ("online-exo", "online-dpo", "rloo", "ppo") for k in (2, 4, 8) for r in ("", "-r4")}
    assert names | online <= set(res["methods"])
    for name, rec in res["methods"].items():
        for key in ("gap", "J", "kl_to_opt", "kl_from_opt", "reward", "kl_to_sft"):
            assert isinstance(rec[key], float) and math.isfinite(rec[key]), (name, key)
        assert isinstance(rec["seeds"], int) and rec["seeds"] >= 1
        assert rec["kl_to_opt"] >= -1e-9 and rec["kl_from_opt"] >= -1e-9 and rec["kl_to_sft"] >= -1e-9
        # nothing beats the optimum, exactly
        assert rec["J"] <= res["methods"]["optimum"]["J"] + 1e-9
    m = res["methods"]
    assert m["optimum"]["gap"] == pytest.approx(0.0, abs=1e-9) and m["sft"]["gap"] == pytest.approx(1.0)
    assert m["rl-exact"]["gap"] < 0.9  # gradient ascent on the exact objective improves on π_sft
    assert res["config"]["beta"] == 0.5 and res["config"]["quick"] is True
    for f in ("results.md", "illustration.png", "gap.png", "curves.png", "illustration.json"):
        assert (out / f).stat().st_size > 0
    assert "| exo-rw-k8 |" in (out / "results.md").read_text()
    assert "| online-exo-k8 |" in (out / "results.md").read_text() and (out / "online.png").stat().st_size > 0
    assert "| ppo-k8-r4 |" in (out / "results.md").read_text() and "PPO r4" in (out / "results.md").read_text()
    # online: ESS of p and q recorded; p is uniform at one use per sample with β_π = 1 (p ∝ π_θ/π_t = 1)
    for name in online | {f"{m}-rw-k{k}" for m in ("exo", "dpo") for k in (2, 4, 8)}:
        assert 0.0 < m[name]["ess_q"] <= 1.0 + 1e-9 and 0.0 < m[name]["ess"] <= 1.0 + 1e-9, name
    for k in (2, 4, 8):
        assert m[f"online-exo-k{k}"]["ess"] == pytest.approx(1.0, abs=1e-5)
        assert m[f"exo-rw-k{k}"]["ess"] < 0.95  # offline p leaves uniform as π_θ moves away from π_sft
        # at one use per sample RLOO's gradient is online EXO's times β K/(K−1): under Adam the same run
        assert m[f"rloo-k{k}"]["gap"] == pytest.approx(m[f"online-exo-k{k}"]["gap"], abs=0.02)
        # and PPO's is RLOO's exactly (ρ = 1): the same trajectory, up to nothing but summation order
        assert m[f"ppo-k{k}"]["gap"] == pytest.approx(m[f"rloo-k{k}"]["gap"], abs=1e-6)
        assert m[f"ppo-k{k}"]["ess"] == pytest.approx(1.0, abs=1e-5) and m[f"ppo-k{k}-r4"]["ess"] < 1.0
    # reusing a round 4 times: PPO's clipped ratio keeps it sound where naive RLOO degrades (0.63 vs 0.76 at K = 8)
    assert m["ppo-k8-r4"]["gap"] < m["rloo-k8-r4"]["gap"] - 0.05
    # sampling from the current policy removes the coverage limit of offline data (issue 13's done-when)
    assert m["online-exo-k8"]["gap"] < m["exo-rw-k8"]["gap"]
    assert not list(out.glob("*.tmp"))
    # the illustration: EXO sits on the dominant (left) mode, DPO spreads (larger σ, larger gap)
    toy = json.loads((out / "illustration.json").read_text())["metrics"]
    assert abs(toy["exo"]["mu"] - 0.25) < 0.05 and toy["exo"]["sigma"] < toy["dpo"]["sigma"]
    assert toy["exo"]["gap"] < toy["dpo"]["gap"]


def test_ancestral_sampling_follows_the_enumerated_table():
    """sample_sequences draws from π_θ exactly: empirical frequencies of 200k draws match the exact table."""
    from exoalign.exact.online import sample_sequences

    pol = _random_policy(seed=5).float()
    with torch.no_grad():
        table = enumerate_logps(pol.double(), torch.arange(2)).exp()  # (2, 81)
    seqs = sample_sequences(pol, torch.tensor([0, 1]), 100_000, torch.Generator().manual_seed(0))  # (2, 100k, 4)
    assert seqs.shape == (2, 100_000, 4)
    for x in range(2):
        freq = torch.bincount(seq_index(seqs[x], 3), minlength=81).double() / 100_000
        se = (table[x] * (1 - table[x]) / 100_000).sqrt()
        assert ((freq - table[x]).abs() <= 5 * se + 1e-4).all()


def test_online_methods_and_their_names():
    from exoalign.exact.train import online_methods, trained_methods

    names = [m.name for m in online_methods((2, 8), (1, 4))]
    assert names == ["online-exo-k2", "online-dpo-k2", "rloo-k2", "ppo-k2", "online-exo-k8", "online-dpo-k8",
                     "rloo-k8", "ppo-k8", "online-exo-k2-r4", "online-dpo-k2-r4", "rloo-k2-r4", "ppo-k2-r4",
                     "online-exo-k8-r4", "online-dpo-k8-r4", "rloo-k8-r4", "ppo-k8-r4"]
    assert {m.reuse for m in online_methods((2,), (1, 4))} == {1, 4}
    assert not any(m.targets == "online" for m in trained_methods((2, 4)))


@pytest.mark.parametrize(
    "argv",
    [
        ["--beta", "-1"],
        ["--beta", "0"],
        ["--beta", "nan"],
        ["--bogus"],
        ["--seed", "x"],
        ["pool=3"],
        ["length=9"],
        ["ks=[1]"],
        ["batch=30"],
        ["reuse=[0]"],
        ["reuse=[1,1]"],
        ["online_seeds=-1"],
        ["no_such_key=1"],
    ],
)
def test_bad_flags_exit_2_with_one_line(argv, tmp_path, capsys):
    assert cli_main(["bench", "exact", "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_unknown_benchmark_exits_2(capsys):
    assert cli_main(["bench", "nope"]) == 2
    assert "exact" in capsys.readouterr().err


def test_add_online_rows_reproduces_a_full_runs_rows_and_refuses_another_sft():
    """benchmarks/exact_add_rows.py's function: the ppo rows added to a finished run equal the rows of the full
    run (each online run depends on its method and seed only); a run whose recorded π_sft fit differs is
    refused with a ConfigError."""
    import copy

    from exoalign.errors import ConfigError
    from exoalign.exact.benchmark import ExactConfig, add_online_rows, run_benchmark

    cfg = ExactConfig(vocab=4, length=3, prompts=2, hidden=4, embed=8, sft_steps=20, pool=16, batch=16, steps=12,
                      seeds=2, online_seeds=1, ks=[2, 4], reuse=[1, 2], best_of_n=[2], eval_every=6, toy_steps=5)
    full, _ = run_benchmark(cfg, progress=False)
    part = copy.deepcopy(full)
    added = [n for n in part["methods"] if n.startswith("ppo-")]
    assert added == ["ppo-k2", "ppo-k4", "ppo-k2-r2", "ppo-k4-r2"]
    for n in added:
        del part["methods"][n]
    add_online_rows(part, ["ppo"], progress=False)
    assert {n: part["methods"][n] for n in added} == {n: full["methods"][n] for n in added}
    assert part["config"]["added"][0]["methods"] == added
    part["config"]["sft_fit_kl"] += 1e-9
    with pytest.raises(ConfigError, match="sft_fit_kl"):
        add_online_rows(part, ["ppo"], progress=False)
