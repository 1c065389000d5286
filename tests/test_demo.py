"""``exoalign demo --quick`` end to end: the results schema, the four runs, the picture and the report, and a
second run that finds every stage cached. Plus the frontier comparison the verdict rests on, by hand."""

from __future__ import annotations

import dataclasses
import json
import math
import time

import numpy as np
import pytest

from exoalign.demo import pipeline as D
from exoalign.demo.frontier import compare, envelope, paired_bootstrap, side, verdict
from exoalign.demo.jobs import usable_cores
from exoalign.hardware import fast_bf16

pytest.importorskip("vaderSentiment")

METHODS = {"exo-pref", "exo-rw", "dpo-pref", "dpo-rw"}
QUICK = ["demo", "--quick", "--model", "scratch", "--device", "cpu"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One ``exoalign demo --quick --model scratch`` through the CLI table, then the same command again."""
    from exoalign.cli import main

    out = tmp_path_factory.mktemp("demo")
    t0 = time.perf_counter()
    assert main([*QUICK, "--out", str(out)]) == 0
    first = time.perf_counter() - t0
    weights = out / "sft" / "final" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    results_first = json.loads((out / "results.json").read_text())
    t0 = time.perf_counter()
    assert main([*QUICK, "--out", str(out)]) == 0
    second = time.perf_counter() - t0
    return {"out": out, "first": first, "second": second, "stamp": stamp, "weights": weights,
            "results_first": results_first}


@pytest.mark.slow
def test_results_schema_methods_and_betas(quick_run):
    results = json.loads((quick_run["out"] / "results.json").read_text())
    assert set(results["runs"]) == METHODS
    s = D.settings_for(quick=True, seed=0, model="scratch")
    assert len(s.beta_pi) >= 2
    sft_points = set()
    for name, points in results["runs"].items():
        for beta in s.beta_pi:
            run = [p for p in points if p["beta_pi"] == beta]
            # π_sft at step 0 of every run, then every checkpoint: save_every, 2·save_every, …, align_steps
            assert [p["step"] for p in run] == list(range(0, s.align_steps + 1, s.save_every)), (name, beta)
            assert all(p["beta_r"] == s.beta_r for p in run)
            assert run[0]["kl"] == 0.0  # π_sft against itself
            sft_points.add(json.dumps({k: v for k, v in run[0].items() if k not in ("beta_pi", "run")}))
            assert max(p["kl"] for p in run[1:]) > 0.05, (name, beta)  # training moved every policy
        for p in points:
            assert isinstance(p["step"], int)
            assert math.isfinite(p["kl"]) and math.isfinite(p["reward"])
            assert -1.0 <= p["reward"] <= 1.0  # VADER compound
        # the frontier is the envelope over both β runs: it starts at π_sft and never falls
        xs, ys = results["frontiers"][name]["kl"], results["frontiers"][name]["reward"]
        assert xs[0] == 0.0 and ys == sorted(ys) and max(ys) == max(p["reward"] for p in points)
    assert len(sft_points) == 1  # all runs start from the same π_sft point
    expected = {"exo-pref_vs_dpo-pref", "exo-rw_vs_dpo-rw"}
    expected |= {f"{m}@{b:g}_vs_{m.replace('exo', 'dpo')}@{b:g}" for m in ("exo-pref", "exo-rw") for b in s.beta_pi}
    assert set(results["comparison"]) == expected
    for c in results["comparison"].values():
        lo, hi = c["ci"]
        assert lo <= c["mean_reward_gap"] + 1e-9 and c["mean_reward_gap"] - 1e-9 <= hi or c["kl_max"] == 0
        assert c["side"] == ("above" if lo > 0 else "below" if hi < 0 else "no difference detected")
        assert c["n_prompts"] == s.n_eval_prompts
    settings = results["settings"]
    assert settings["model_name"] == "scratch" and 1e5 < settings["model_parameters"] < 1e7
    ran = dataclasses.asdict(s.for_device("cpu"))  # the settings that ran: auto precisions made concrete
    assert {k: settings[k] for k in ran} == ran and "auto" not in (settings["mixed_precision"], settings["sample_dtype"])


@pytest.mark.slow
def test_picture_report_examples_and_definitions(quick_run):
    out = quick_run["out"]
    png = (out / "frontier.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    report = (out / "report.md").read_text()
    assert "![reward–KL frontier](frontier.png)" in report
    results = json.loads((out / "results.json").read_text())
    for line in results["verdict"].splitlines():
        assert line in report
    for name in METHODS:
        assert name in report
    assert "## Timings" in report and "## Settings" in report
    assert "**k1**" in report and "**k3**" in report and "**tokens**" in report
    ex = results["examples"]
    assert len(ex["prompts"]) == 3 and len(ex["sft"]["completions"]) == 3
    for name in METHODS:
        assert len(ex[name]["completions"]) == 3 and ex[name]["step"] > 0
        assert ex[name]["reward"] == max(p["reward"] for p in results["runs"][name] if p["step"] > 0)
        assert ex[name]["completions"][0][:20].replace("|", "\\|") in report
    table = (out / "frontier.md").read_text()
    assert table.count("\n") == 1 + 1 + sum(len(p) for p in results["runs"].values())


@pytest.mark.slow
def test_second_run_skips_every_stage(quick_run):
    results = json.loads((quick_run["out"] / "results.json").read_text())
    stages = results["timings"]
    assert len(stages) == 6 + 8 + 9  # corpus…label, 4 methods × 2 β trainings, their evaluations + π_sft's
    assert all(t["cached"] for t in stages.values()), stages
    assert quick_run["weights"].stat().st_mtime_ns == quick_run["stamp"]  # π_sft was not retrained
    assert quick_run["second"] < max(20.0, 0.25 * quick_run["first"])
    # the numbers are the same: the report is rebuilt from the cached evaluations
    assert results["runs"] == quick_run["results_first"]["runs"]
    # every job's start-up overheads are recorded (and kept by the cached second run) and reported
    first = quick_run["results_first"]["timings"]
    for name, t in first.items():
        if name.startswith("train "):
            o = t["overheads"]
            assert all(o.get(k) is not None and o[k] >= 0 for k in ("setup_s", "load_s", "reference_s", "first_step_s")), o
        elif name.startswith("eval "):
            assert t["overheads"]["setup_s"] >= 0 and t["overheads"]["checkpoints"]
    if usable_cores() > 1:  # jobs ran in spawned workers, whose first jobs paid the process's start
        assert any("process_start_s" in t.get("overheads", {}) for t in first.values())
    assert all(stages[n].get("overheads") == t.get("overheads") for n, t in first.items())
    assert "| job | process start |" in (quick_run["out"] / "report.md").read_text()


def test_changing_a_training_setting_invalidates_only_later_stages():
    quick = D.settings_for(quick=True, seed=0, model="scratch")
    base = D.Demo(D.Path("x"), quick, "cpu").fingerprints()
    changed = D.Demo(D.Path("x"), dataclasses.replace(quick, align_lr=1e-3), "cpu").fingerprints()
    assert [k for k in base if base[k] != changed[k]] == ["train", "eval"]
    other_seed = D.Demo(D.Path("x"), D.settings_for(quick=True, seed=1, model="scratch"), "cpu").fingerprints()
    assert all(base[k] != other_seed[k] for k in base)
    # the toy's SFT settings do not touch a real model's stages; the prompt format does
    real = D.settings_for(quick=True, seed=0)
    fp = D.Demo(D.Path("x"), real, "cpu").fingerprints()
    assert fp == D.Demo(D.Path("x"), dataclasses.replace(real, n_layer=7, sft_lr=1.0), "cpu").fingerprints()
    raw = D.Demo(D.Path("x"), dataclasses.replace(real, prompt_format="raw"), "cpu").fingerprints()
    assert [k for k in fp if fp[k] != raw[k]] == ["prompts", "sample", "score", "label", "train", "eval"]


def test_online_methods_join_at_their_own_beta():
    """online-exo and rloo run once, at online_beta_pi, with fingerprints that follow the online settings only."""
    s = D.settings_for(False, 0, ["methods=[exo-rw,dpo-rw,exo-pref,dpo-pref,online-exo,rloo]"])
    demo = D.Demo(D.Path("x"), s, "cpu")
    runs = demo.run_list()
    assert [r for r in runs if r[1] in ("online-exo", "rloo")] == [("online-exo_bpi1", "online-exo", 1.0),
                                                                   ("rloo_bpi1", "rloo", 1.0)]
    assert len(runs) == 2 + 4 * len(s.beta_pi) and demo.steps("rloo") == s.online_rounds
    more = D.Demo(D.Path("x"), dataclasses.replace(s, online_rounds=3), "cpu")
    fp, fp3 = demo.fingerprints()["train"], more.fingerprints()["train"]
    assert fp == fp3 and demo.train_fp(fp, "rloo", 1.0) != more.train_fp(fp, "rloo", 1.0)
    assert demo.train_fp(fp, "exo-rw", 1.0) == more.train_fp(fp, "exo-rw", 1.0)


def test_envelope_and_comparison_by_hand():
    """Run a: (0, 0.0), (1, 0.4), (2, 0.3) → envelope (0, 0)-(1, 0.4), flat 0.4 after KL 1.
    Run b: (0, 0.0), (2, 0.2) → line of slope 0.1. Common KL range [0, 2] (both reached KL 2).
    a − b = 0.3·x on [0, 1] and 0.4 − 0.1·x on [1, 2]; its mean over [0, 2] is
    (0.15 + 0.25) / 2 = 0.2, and a > b everywhere but at 0 (200 of 201 grid points)."""
    a = [{"kl": 0.0, "reward": 0.0}, {"kl": 1.0, "reward": 0.4}, {"kl": 2.0, "reward": 0.3}]
    b = [{"kl": -0.01, "reward": 0.0}, {"kl": 2.0, "reward": 0.2}]
    xs, ys = envelope(a)
    assert xs.tolist() == [0.0, 1.0] and ys.tolist() == [0.0, 0.4]
    c = compare(a, b)
    assert c["kl_max"] == 2.0
    assert c["mean_reward_gap"] == pytest.approx(0.2, abs=1e-3)
    assert c["frac_above"] == pytest.approx(200 / 201)
    assert c["reward_a_at_kl_max"] == pytest.approx(0.4) and c["reward_b_at_kl_max"] == pytest.approx(0.2)
    assert compare(a, a)["mean_reward_gap"] == 0.0


def _pts(kls, prompt_rewards, prompt_kls=None):
    """Points whose per-prompt means are given (KL the same on every prompt unless prompt_kls is)."""
    out = []
    for i, (kl, pr) in enumerate(zip(kls, prompt_rewards)):
        pk = [kl] * len(pr) if prompt_kls is None else prompt_kls[i]
        out.append({"kl": float(np.mean(pk)), "reward": float(np.mean(pr)), "prompt_reward": list(pr),
                    "prompt_kl": list(pk)})
    return out


def test_paired_bootstrap_verdicts():
    """b's checkpoints: π_sft (KL 0, reward 0) and one at KL 1 with per-prompt rewards in [0.2, 1] that vary a lot
    across prompts.
    a = b + 0.1 on every prompt at the KL-1 checkpoint: the envelope gap is 0.1·x on [0, 1], mean 0.05 on
    every resample (the prompt noise cancels in the pair), so the interval is [0.05, 0.05] → "above".
    Swapped → "below". A difference that flips sign between prompts (±0.3, mean 0) → "no difference
    detected" although each resample's gap is rarely exactly 0."""
    rng = np.random.default_rng(0)
    n = 40
    base = rng.uniform(0.2, 1, n)  # positive: the KL-1 checkpoint is on both envelopes in every resample
    zero = np.zeros(n)
    b = _pts([0.0, 1.0], [zero, base])
    a = _pts([0.0, 1.0], [zero, base + 0.1])
    c = paired_bootstrap(a, b, n_boot=300, seed=1)
    assert c["mean_reward_gap"] == pytest.approx(0.05, abs=2e-3)
    assert c["ci"] == pytest.approx([0.05, 0.05], abs=2e-3) and c["side"] == "above"
    assert "ABOVE" in verdict({"a_vs_b": c})
    assert paired_bootstrap(b, a, n_boot=300, seed=1)["side"] == "below"
    flip = np.where(np.arange(n) % 2 == 0, 0.3, -0.3)
    c = paired_bootstrap(_pts([0.0, 1.0], [zero, base + flip]), b, n_boot=300, seed=1)
    assert c["ci"][0] < 0 < c["ci"][1] and c["side"] == "no difference detected"
    assert "NO DIFFERENCE DETECTED" in verdict({"a_vs_b": c})
    assert side(0.01, 0.2) == "above" and side(-0.2, -0.01) == "below" and side(-0.01, 0.01).startswith("no")


def test_cuda_without_a_gpu_is_a_clean_input_error(tmp_path, capsys):
    import torch

    from exoalign.cli import main

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["demo", "--quick", "--model", "scratch", "--device", "cuda", "--out", str(tmp_path / "d")]) == 2
    assert "--device cpu" in capsys.readouterr().err


def test_overrides_are_key_value_and_checked(tmp_path, capsys):
    from exoalign.cli import main

    assert D.settings_for(False, 2, ["beta_r=1.0", "k=8"]) == dataclasses.replace(D.DemoSettings(), seed=2, beta_r=1.0, k=8)
    assert D.settings_for(False, 0, ["model=scratch"]).align_steps == 200  # the toy's preset follows model=
    s = D.settings_for(True, 0, ["beta_pi=[0.3,1]", "align_lr=1e-4"], model="scratch")
    assert s.beta_pi == [0.3, 1.0] and s.align_lr == 1e-4 and s.n_layer == D.QUICK_SCRATCH["n_layer"]
    for argv, needle in [(["betar=1"], "did you mean 'beta_r'"), (["--set", "betar=1"], "did you mean 'beta_r'"),
                         (["--betar", "1"], "did you mean 'beta_r'"), (["save_every=100"], "save_every"),
                         (["methods=[exo-rw,kto]"], "methods"), (["--device", "tpu"], "--device")]:
        assert main(["demo", "--quick", "--model", "scratch", *argv, "--out", str(tmp_path / "d")]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, (argv, err)
        assert "usage:" not in err
    assert not (tmp_path / "d").exists()  # rejected before anything was written


@pytest.mark.slow
def test_first_updates_of_exo_and_dpo_pref_are_parallel(quick_run):
    """At π_sft every log-ratio is 0, so per pair ∂L/∂(h_w − h_l) is −(½ − ε) for DPO and −¼·log((1−ε)/ε)
    for EXO (β_π factored out): the same constant for every pair. The parameter gradients are parallel and
    EXO's is longer by ¼·log(999)/0.499 = 3.4604 at ε = 1e-3."""
    from exoalign.demo.diagnose import first_update_cosines

    c = first_update_cosines(quick_run["out"], n_groups=32)
    assert c["pref_grad_cosine"] == pytest.approx(1.0, abs=1e-4)
    assert c["pref_grad_norm_ratio_exo_over_dpo"] == pytest.approx(0.25 * math.log(0.999 / 0.001) / 0.499, rel=1e-3)
    # with reward targets the directions differ (EXO: centred rewards; DPO: best vs the rest)
    assert c["rw_grad_cosine"] < 0.99


@pytest.mark.slow
def test_a_deleted_output_is_remade_and_nothing_else(quick_run):
    from exoalign.cli import main

    out = quick_run["out"]
    name = "dpo-rw_bpi0.1"
    (out / "eval" / f"{name}.json").unlink()
    assert main([*QUICK, "--out", str(out)]) == 0
    timings = json.loads((out / "results.json").read_text())["timings"]
    assert [k for k, t in timings.items() if not t["cached"]] == [f"eval {name}"]
    assert (out / "eval" / f"{name}.json").is_file()


@pytest.mark.slow
def test_a_run_is_trained_and_evaluated_by_one_job_without_writing_its_last_step(quick_run, tmp_path, monkeypatch):
    """A run still to train is trained and evaluated in one job: the checkpoints of the evaluated steps before the
    last are written as usual, the last step goes to the evaluation in memory (with keep_checkpoints=false it is
    never written), both jobs are marked and timed, and the numbers are those of the first run."""
    import shutil

    from exoalign.cli import main
    from exoalign.train import engine

    out = tmp_path / "demo"
    shutil.copytree(quick_run["out"], out)
    name = "exo-rw_bpi1"
    for path in (out / ".stages" / f"train {name}.json", out / ".stages" / f"eval {name}.json",
                 out / "eval" / f"{name}.json"):
        path.unlink()
    shutil.rmtree(out / "runs" / name)
    saved, real = [], engine.save_checkpoint
    monkeypatch.setattr(engine, "save_checkpoint", lambda *a, **k: saved.append(a[4]) or real(*a, **k))
    assert main([*QUICK, "--out", str(out), "keep_checkpoints=false", "workers=1"]) == 0
    results = json.loads((out / "results.json").read_text())
    fresh = {k for k, t in results["timings"].items() if not t["cached"]}
    assert fresh == {f"train {name}", f"eval {name}"}
    assert all(results["timings"][k]["seconds"] > 0 for k in fresh)
    steps = [r["step"] for r in json.loads((out / "eval" / f"{name}.json").read_text())["results"]]
    assert steps == [8, 16, 24] and saved == [8, 16]  # checkpoint-24 was evaluated from memory
    assert not (out / "runs" / name / "checkpoint-8").exists()  # evaluated, then dropped (keep_checkpoints=false)
    first = quick_run["results_first"]["runs"]
    assert results["runs"]["exo-rw"] == first["exo-rw"]


@pytest.mark.slow
@pytest.mark.real
def test_micro_demo_on_smollm2(tmp_path):
    """The default model end to end at toy sizes (4 training prompts × K=2, 8 new tokens, one step per run,
    one β_π, two methods, every job in this process): π_sft is SmolLM2 itself, the prompts go through its chat
    template, results.json records the model and its size, and the verdict comes from a paired interval."""
    from exoalign.cli import main

    out = tmp_path / "d"
    tiny = ["n_train_prompts=4", "n_eval_prompts=3", "k=2", "max_new_tokens=8", "align_steps=1", "save_every=1",
            "align_batch_size=2", "methods=[exo-rw,dpo-rw]", "beta_pi=[1.0]", "workers=1", "n_bootstrap=100"]
    assert main(["demo", "--device", "cpu", "--out", str(out), *tiny]) == 0
    results = json.loads((out / "results.json").read_text())
    s = results["settings"]
    assert s["model_name"] == "smollm2" and s["model_parameters"] > 100e6 and s["model_type"] == "llama"
    assert set(results["runs"]) == {"exo-rw", "dpo-rw"}
    for points in results["runs"].values():
        assert [(p["step"], p["beta_pi"], p["beta_r"]) for p in points] == [(0, 1.0, 0.1), (1, 1.0, 0.1)]
        assert points[0]["kl"] == 0.0 and points[1]["length"] <= 8
    group = json.loads((out / "data" / "groups.jsonl").read_text().splitlines()[0])
    assert group["prompt"].startswith("<|im_start|>") and "Continue this movie review: " in group["prompt"]
    c = results["comparison"]["exo-rw_vs_dpo-rw"]
    assert c["side"] == ("above" if c["ci"][0] > 0 else "below" if c["ci"][1] < 0 else "no difference detected")
    assert not list((out / "runs").glob("*/checkpoint-*/state"))  # the training state was pruned
    assert not (out / "data" / "pairs.jsonl").exists()  # no pref method: no pairs
    # sampled from bf16 copies where the CPU multiplies bf16 fast (sample_dtype=auto for a real model), from the
    # fp32 model elsewhere, in both the sample stage and the eval; training in bf16 / fp32 alike
    want = "bfloat16" if fast_bf16("cpu") else "model"
    assert json.loads((out / "data" / "groups.jsonl.meta.json").read_text()).get("sample_dtype", "model") == want
    assert json.loads((out / "eval" / "sft.json").read_text())["settings"].get("sample_dtype", "model") == want
    assert s["mixed_precision"] == ("bf16" if want == "bfloat16" else "fp32")
