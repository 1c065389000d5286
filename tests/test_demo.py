"""``exoalign demo --quick`` end to end: the results schema, the four runs, the picture and the report, and a
second run that finds every stage cached. Plus the frontier comparison the verdict rests on, by hand."""

from __future__ import annotations

import dataclasses
import json
import math
import time

import pytest

from exoalign.demo import pipeline as D
from exoalign.demo.report import compare, envelope, verdict

pytest.importorskip("vaderSentiment")

METHODS = {"exo-pref", "exo-rw", "dpo-pref", "dpo-rw"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One ``exoalign demo --quick`` through the CLI table, then the same command again."""
    from exoalign.cli import main

    out = tmp_path_factory.mktemp("demo")
    t0 = time.perf_counter()
    assert main(["demo", "--quick", "--out", str(out), "--device", "cpu"]) == 0
    first = time.perf_counter() - t0
    weights = out / "sft" / "final" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    results_first = json.loads((out / "results.json").read_text())
    t0 = time.perf_counter()
    assert main(["demo", "--quick", "--out", str(out), "--device", "cpu"]) == 0
    second = time.perf_counter() - t0
    return {"out": out, "first": first, "second": second, "stamp": stamp, "weights": weights,
            "results_first": results_first}


def test_results_schema_and_four_runs(quick_run):
    results = json.loads((quick_run["out"] / "results.json").read_text())
    assert set(results["runs"]) == METHODS
    s = D.settings_for(quick=True, seed=0)
    for name, points in results["runs"].items():
        steps = [p["step"] for p in points]
        # π_sft at step 0, then every checkpoint: save_every, 2·save_every, …, align_steps
        assert steps == list(range(0, s.align_steps + 1, s.save_every)), name
        for p in points:
            assert isinstance(p["step"], int)
            assert math.isfinite(p["kl"]) and math.isfinite(p["reward"])
            assert -1.0 <= p["reward"] <= 1.0  # VADER compound
        assert points[0]["kl"] == 0.0  # π_sft against itself
        # training moved every policy away from π_sft
        assert max(p["kl"] for p in points[1:]) > 0.05, name
    # all runs start from the same π_sft point
    assert len({json.dumps(r[0]) for r in results["runs"].values()}) == 1
    assert set(results["comparison"]) == {"exo-pref_vs_dpo-pref", "exo-rw_vs_dpo-rw"}
    assert results["settings"] == dataclasses.asdict(s)


def test_picture_and_report(quick_run):
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


def test_second_run_skips_every_stage(quick_run):
    results = json.loads((quick_run["out"] / "results.json").read_text())
    stages = results["timings"]
    assert len(stages) == 6 + 4 + 5  # corpus…label, four trainings, five evaluations (π_sft + 4 runs)
    assert all(t["cached"] for t in stages.values()), stages
    assert quick_run["weights"].stat().st_mtime_ns == quick_run["stamp"]  # π_sft was not retrained
    assert quick_run["second"] < max(20.0, 0.25 * quick_run["first"])
    # the numbers are the same: the report is rebuilt from the cached evaluations
    assert results["runs"] == quick_run["results_first"]["runs"]


def test_changing_a_training_setting_invalidates_only_later_stages():
    base = D.Demo(D.Path("x"), D.settings_for(quick=True, seed=0), "cpu").fingerprints()
    lr = dataclasses.replace(D.settings_for(quick=True, seed=0), align_lr=1e-3)
    changed = D.Demo(D.Path("x"), lr, "cpu").fingerprints()
    assert [k for k in base if base[k] != changed[k]] == ["train", "eval"]
    other_seed = D.Demo(D.Path("x"), D.settings_for(quick=True, seed=1), "cpu").fingerprints()
    assert all(base[k] != other_seed[k] for k in base)


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
    assert "ABOVE" in verdict({"a_vs_b": c})
    assert "BELOW" in verdict({"b_vs_a": compare(b, a)})
    level = compare(a, a)
    assert level["mean_reward_gap"] == 0.0 and "LEVEL WITH" in verdict({"a_vs_a": level})


def test_cuda_without_a_gpu_is_a_clean_input_error(tmp_path, capsys):
    import torch

    from exoalign.cli import main

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["demo", "--quick", "--device", "cuda", "--out", str(tmp_path / "d")]) == 2
    assert "--device cpu" in capsys.readouterr().err


def test_set_overrides_are_checked(tmp_path, capsys):
    from exoalign.cli import main

    assert D.settings_for(False, 2, ["beta_r=1.0", "k=8"]) == dataclasses.replace(D.DemoSettings(), seed=2, beta_r=1.0, k=8)
    assert main(["demo", "--quick", "--set", "betar=1", "--out", str(tmp_path / "d")]) == 2
    assert "did you mean 'beta_r'" in capsys.readouterr().err
    assert main(["demo", "--quick", "--set", "save_every=100", "--out", str(tmp_path / "d")]) == 2
    assert not (tmp_path / "d").exists()  # rejected before anything was written


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


def test_a_deleted_output_is_remade_and_nothing_else(quick_run):
    from exoalign.cli import main

    out = quick_run["out"]
    (out / "eval" / "dpo-rw.json").unlink()
    assert main(["demo", "--quick", "--out", str(out), "--device", "cpu"]) == 0
    timings = json.loads((out / "results.json").read_text())["timings"]
    assert [k for k, t in timings.items() if not t["cached"]] == ["eval dpo-rw"]
    assert (out / "eval" / "dpo-rw.json").is_file()
