"""The demo's three sizes: the default (offline and online frontiers) and ``--full`` (seeds, pooled verdict,
run-level resume), end to end on a tiny GPT-2 directory standing in for SmolLM2 with tiny swaps; the presets'
budgets; the pooled bootstrap by hand."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from exoalign.demo import pipeline as D
from exoalign.demo import settings as S
from exoalign.demo.frontier import paired_bootstrap, pooled_bootstrap

pytest.importorskip("vaderSentiment")

TINY = ["prompt_format=raw", "n_eval_prompts=6", "max_new_tokens=6", "max_prompt_length=24", "max_length=48",
        "n_bootstrap=100", "workers=1", "gen_batch_size=16", "align_lr=1e-3", "mixed_precision=fp32"]
"""Swaps that keep every stage and method but make them tiny (the tiny GPT-2 has no chat template)."""
ONLINE_NOW = [m for m in S.ONLINE_METHODS if S._registered(S.ONLINE_LOSSES[m])]
"""ppo joins once its loss is in the registry; until then the --full tests run the other five methods."""
FULL_METHODS = [m for m in S.FULL_METHODS if m in S.OFFLINE_METHODS or m in ONLINE_NOW]


def _steps(points):
    return [p["step"] for p in points]


def test_default_is_offline_and_online_frontiers():
    s = D.settings_for(False, 0)
    assert s.methods == ["exo-rw", "dpo-rw", "online-exo", "rloo"] and s.beta_pi == [1.0]
    demo = D.Demo(D.Path("x"), s, "cpu")
    for m in s.methods:
        assert len(demo.eval_steps(m)) >= 4, m  # ≥ 4 checkpoints per run, plus π_sft
    # the same budget: steps, prompts per step, sampled completions (each used once)
    assert demo.steps("online-exo") == demo.steps("exo-rw") == s.align_steps
    assert s.n_train_prompts == s.align_steps * s.align_batch_size and not s.keep_checkpoints
    # passes without gradients take at least 16 groups (one weight cast per pass under bf16), never fewer than a step
    assert demo._train_args(output_dir="r", batch_size=s.align_batch_size).ref_batch_size == D.REF_BATCH_SIZE == 16
    assert demo._train_args(output_dir="r", batch_size=64).ref_batch_size == 64


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_full_presets_give_every_method_the_same_budget(device):
    s = D.settings_for(False, 0, [f"methods={json.dumps(FULL_METHODS)}"], device=device, full=True)
    demo = D.Demo(D.Path("x"), s, device)
    steps = {m: demo.steps(m) for m in s.methods}
    assert set(steps.values()) == {s.align_steps}, steps
    # sampled completions: offline n_train_prompts × K once; online rounds × prompts per round × K
    assert s.n_train_prompts * s.k == s.online_rounds * s.align_batch_size * s.k
    # each used online_reuse times: offline epochs = steps × batch / prompts
    assert s.align_steps * s.align_batch_size == s.online_reuse * s.n_train_prompts
    assert all(len(demo.eval_steps(m)) >= 6 for m in s.methods) and s.beta_pi == [1.0]
    if device == "cuda":  # the paper's scale
        assert s.align_batch_size >= 64 and s.align_steps >= 200 and len(demo.eval_steps("exo-rw")) == 10
    assert set(S.FULL_METHODS) == {"exo-rw", "dpo-rw", "online-exo", "online-dpo", "rloo", "ppo"}


def test_an_online_method_without_its_loss_is_a_clean_error(monkeypatch, tmp_path, capsys):
    from exoalign.cli import main

    monkeypatch.setattr(S, "_registered", lambda loss: loss != "ppo")
    assert main(["demo", "--full", "--model", "scratch", "--out", str(tmp_path / "w"), "--results",
                 str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "ppo" in err and "methods" in err
    assert not (tmp_path / "r").exists()
    assert main(["demo", "--full", "--quick", "--out", str(tmp_path / "w")]) == 2
    assert "--full" in capsys.readouterr().err


@pytest.mark.slow
def test_default_pipeline_end_to_end(tmp_path, tiny_model_dir):
    """``exoalign demo`` with its default methods, β and checkpoint spacing, tiny sizes: a frontier of
    ≥ 4 checkpoints + π_sft per run, the checkpoints deleted once evaluated, π_sft ppl on every point."""
    from exoalign.cli import main

    out = tmp_path / "d"
    tiny = [*TINY, "n_train_prompts=8", "align_steps=4", "align_batch_size=2", "save_every=1", "online_rounds=4"]
    assert main(["demo", "--model", str(tiny_model_dir), "--device", "cpu", "--out", str(out), *tiny]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["runs"]) == {"exo-rw", "dpo-rw", "online-exo", "rloo"}
    for points in results["runs"].values():
        assert _steps(points) == [0, 1, 2, 3, 4]
        assert all(p["sft_ppl"] > 1 for p in points)
    assert points[0]["sft_ppl"] == results["quality"]["sft"]["sft_ppl"]
    assert {"exo-rw_vs_dpo-rw", "online-exo_vs_rloo", "online-exo_vs_exo-rw"} <= set(results["comparison"])
    for c in results["comparison"].values():
        assert c["ci_half_width"] == pytest.approx((c["ci"][1] - c["ci"][0]) / 2) and c["mde80"] >= 0
    assert not list((out / "runs").glob("*/checkpoint-*")), "evaluated checkpoints are deleted"
    report = (out / "report.md").read_text()
    assert "Power reached" in report and "Completion quality" in report and "π_sft ppl" in report


def _full(tmp_path, model_dir, seeds="0,1"):
    from exoalign.cli import main

    tiny = [*TINY, "n_train_prompts=4", "align_batch_size=2", "align_steps=4", "online_rounds=2", "save_every=2",
            f"methods={json.dumps(FULL_METHODS)}"]
    argv = ["demo", "--full", "--model", str(model_dir), "--device", "cpu", "--seeds", seeds,
            "--out", str(tmp_path / "work"), "--results", str(tmp_path / "res"), *tiny]
    assert main(argv) == 0
    return tmp_path / "res"


@pytest.mark.slow
def test_full_pipeline_seeds_pooled_report_and_run_level_resume(tmp_path, tiny_model_dir):
    """Two seeds of ``--full`` (tiny): per seed results.json / frontier.png / report.md and the small files a
    resume needs; the pooled results.json in today's comparison schema; then, with the large files gone (another
    machine) and one run's evaluation deleted, a rerun trains and evaluates that run alone."""
    res = _full(tmp_path, tiny_model_dir)
    for seed in (0, 1):
        d = res / f"full-seed{seed}"
        for name in ("results.json", "frontier.png", "report.md", "data/scored.jsonl", "eval/sft.json"):
            assert (d / name).is_file(), name
        results = json.loads((d / "results.json").read_text())
        assert results["seed"] == seed and set(results["runs"]) == set(FULL_METHODS)
        for points in results["runs"].values():
            assert _steps(points) == [0, 2, 4]  # π_sft + every save_every-th step
        assert not list((d / "runs").glob("*")) and not (d / "cache").exists()  # the large files are elsewhere
        assert not list((tmp_path / "work" / f"full-seed{seed}" / "runs").glob("*/checkpoint-*"))
    pooled = json.loads((res / "full-pooled" / "results.json").read_text())
    expected = {"exo-rw_vs_dpo-rw", "online-exo_vs_rloo", "online-exo_vs_exo-rw", "online-exo_vs_online-dpo"}
    if "ppo" in FULL_METHODS:
        expected.add("online-exo_vs_ppo")
    assert set(pooled["comparison"]) == expected
    for key, c in pooled["comparison"].items():
        lo, hi = c["ci"]
        assert {"mean_reward_gap", "ci", "side", "ci_half_width", "mde80", "n_seeds"} <= set(c)
        assert c["side"] == ("above" if lo > 0 else "below" if hi < 0 else "no difference detected")
        assert c["n_seeds"] == 2 and c["n_prompts"] == 2 * 6
        per_seed = [json.loads((res / f"full-seed{s}" / "results.json").read_text())["comparison"][key]
                    for s in (0, 1)]
        # the pooled point estimate is the mean of the seeds' gaps
        assert c["mean_reward_gap"] == pytest.approx(np.mean([p["mean_reward_gap"] for p in per_seed]))
        assert pooled["per_seed"]["1"][key]["ci"] == per_seed[1]["ci"]
    assert pooled["power"]["target_ci_half_width"] == 0.03
    assert (res / "full-pooled" / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    assert "Pooled verdict" in (res / "full-pooled" / "report.md").read_text()

    # Resume on "another machine": no work directory, one run's evaluation missing.
    shutil.rmtree(tmp_path / "work")
    (res / "full-seed1" / "eval" / "rloo_bpi1.json").unlink()
    res = _full(tmp_path, tiny_model_dir)
    timings = json.loads((res / "full-seed1" / "results.json").read_text())["timings"]
    assert sorted(k for k, t in timings.items() if not t["cached"]) == ["eval rloo_bpi1", "train rloo_bpi1"]
    timings = json.loads((res / "full-seed0" / "results.json").read_text())["timings"]
    assert all(t["cached"] for t in timings.values())


def _pts(kls, prompt_rewards):
    return [{"kl": kl, "reward": float(np.mean(pr)), "prompt_reward": list(pr), "prompt_kl": [kl] * len(pr)}
            for kl, pr in zip(kls, prompt_rewards)]


def test_pooled_bootstrap_by_hand():
    """Seed 0: a = b + 0.1 on every prompt at the KL-1 checkpoint → gap 0.05 (half the range's mean, as in
    test_demo's paired case); seed 1: + 0.3 → gap 0.15. Pooled = their mean 0.10, with no noise in the
    difference, so every stratified resample gives 0.10 → "above". One seed alone equals paired_bootstrap."""
    rng = np.random.default_rng(0)
    a, b = [], []
    for shift, n in ((0.1, 30), (0.3, 50)):
        base, zero = rng.uniform(0.2, 0.6, n), np.zeros(n)
        b.append(_pts([0.0, 1.0], [zero, base]))
        a.append(_pts([0.0, 1.0], [zero, base + shift]))
    c = pooled_bootstrap(a, b, n_boot=200, seed=0)
    assert c["mean_reward_gap"] == pytest.approx(0.10, abs=1e-3)
    assert c["ci"] == pytest.approx([0.10, 0.10], abs=1e-3) and c["side"] == "above"
    assert c["per_seed_gap"] == pytest.approx([0.05, 0.15], abs=1e-3) and c["n_prompts"] == 80
    one = pooled_bootstrap(a[:1], b[:1], n_boot=200, seed=0)
    assert one["mean_reward_gap"] == pytest.approx(paired_bootstrap(a[0], b[0], n_boot=200, seed=0)["mean_reward_gap"])
    assert pooled_bootstrap(b, a, n_boot=200, seed=0)["side"] == "below"


@pytest.mark.slow
def test_full_cuda_preset_runs_on_the_cpu_with_tiny_swaps(tmp_path, tiny_model_dir):
    """``--full --device cuda``'s preset (fp32, large generation batches, its checkpoint spacing) through the
    same pipeline on the CPU, every size swapped tiny: one seed and the pooled report of it."""
    from exoalign.demo.full import run_full

    tiny = [*TINY, "n_train_prompts=4", "align_batch_size=2", "align_steps=4", "online_rounds=2", "save_every=2",
            f"methods={json.dumps(FULL_METHODS)}"]
    s = D.settings_for(False, 0, tiny, model=str(tiny_model_dir), device="cuda", full=True)
    assert s.gen_batch_size == 16 and s.mixed_precision == "fp32" and s.n_eval_prompts == 6
    methods = [f"methods={json.dumps(FULL_METHODS)}"]
    assert D.settings_for(False, 0, methods, device="cuda", full=True).gen_batch_size == S.FULL_CUDA["gen_batch_size"]
    pooled = run_full(tmp_path / "res", tmp_path / "work", [0],
                      lambda out, work, seed: D.Demo(out, s, "cpu", work).run())
    assert pooled["seeds"] == [0] and "exo-rw_vs_dpo-rw" in pooled["comparison"]
    assert all(_steps(p) == [0, 2, 4] for p in pooled["runs"].values())
