"""``train`` and ``sft`` end with one summary line, and warn when the run cannot have changed the model."""

from __future__ import annotations

import json
from pathlib import Path

from exoalign.cli import main as cli
from exoalign.train.engine import read_metrics
from exoalign.train.summary import MIN_KL, MIN_STEPS, read_summary, summary_line, too_small

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
SFT_SMOKE = ROOT / "configs" / "sft_smoke.yaml"


def _metrics(path: Path, records: list[dict]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 9, "lo',
                                        encoding="utf-8")  # a torn last line is ignored
    return path


def test_summary_line_and_warnings_from_the_metrics(tmp_path):
    recs = [{"step": 10, "loss": 0.6931, "rewards/margins": 0.01, "rewards/accuracies": 0.5, "kl/batch": 0.001},
            {"step": 10, "eval/loss": 0.61, "eval/rewards/accuracies": 0.75},
            {"step": 40, "loss": 0.25, "rewards/margins": 1.9, "rewards/accuracies": 0.875, "kl/batch": 0.35}]
    s = read_summary(_metrics(tmp_path / "a", recs))
    assert s.steps == 40 and s.kl == 0.35
    line = summary_line(s)
    assert line == ("summary: 40 optimizer steps; loss 0.6931 → 0.25; reward margin 0.01 → 1.9; accuracy 0.5 → 0.88; "
                    "KL(π_sft‖π_θ) 0.35 nats (k1, last logged training batches); held-out loss 0.61, accuracy 0.75")
    assert too_small(s, lr=1e-5) is None
    # Few steps, and a policy that barely moved: both reasons named, with the fix.
    few = read_summary(_metrics(tmp_path / "b", [{"step": 3, "loss": 0.69, "kl/batch": 0.004}]))
    warning = too_small(few, lr=1e-6)
    assert warning.startswith("warning:") and f"only 3 optimizer steps (fewer than {MIN_STEPS})" in warning
    assert f"at most 0.004 nats from the reference (below {MIN_KL})" in warning and "train.lr=1e-06" in warning
    assert "Fix:" in warning
    # Enough steps but no drift: still flagged; an SFT run (no KL) with enough steps is not.
    still = read_summary(_metrics(tmp_path / "c", [{"step": 40, "loss": 0.69, "kl/batch": 0.008},
                                                    {"step": 50, "loss": 0.69, "kl/batch": -0.002}]))
    assert "only" not in too_small(still, lr=1e-5) and "at most 0.008 nats" in too_small(still, lr=1e-5)
    # A policy that moved, whose short last window happens to estimate a KL near 0, is not flagged.
    moved = read_summary(_metrics(tmp_path / "m", [{"step": 30, "loss": 0.6, "kl/batch": 0.7},
                                                    {"step": 32, "loss": 0.4, "kl/batch": 0.004}]))
    assert moved.kl == 0.004 and moved.kl_max == 0.7 and too_small(moved, lr=1e-5) is None
    sft = read_summary(_metrics(tmp_path / "d", [{"step": 5, "loss": 3.0}, {"step": 30, "loss": 2.0}]))
    assert summary_line(sft) == "summary: 30 optimizer steps; loss 3 → 2" and too_small(sft, lr=1e-5) is None
    one = read_summary(_metrics(tmp_path / "e", [{"step": 3, "loss": 2.5}]))
    assert summary_line(one) == "summary: 3 optimizer steps; loss 2.5"  # one logged window: no arrow
    assert read_summary(tmp_path / "nothing") is None


def _summary(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("summary:")]


def test_train_ends_with_the_summary_and_warns_when_too_small(tmp_path, capsys):
    base = ["--config", str(SMOKE), f"train.ref_cache_dir={tmp_path / 'cache'}", "train.save_every=0",
            "data.max_length=40", "train.warmup_steps=0", "train.log_every=1"]
    assert cli(["train", *base, f"train.output_dir={tmp_path / 'short'}", "train.max_steps=3"]) == 0
    err = capsys.readouterr().err
    (line,) = _summary(err)
    recs = [r for r in read_metrics(tmp_path / "short") if "loss" in r]
    assert line.startswith(f"summary: 3 optimizer steps; loss {recs[0]['loss']:.4g} → {recs[-1]['loss']:.4g}; "
                           "reward margin ")
    assert "accuracy" in line and "KL(π_sft‖π_θ)" in line and "held-out loss" in line
    warnings = [x for x in err.splitlines() if x.startswith("warning: this run cannot have changed the model")]
    assert len(warnings) == 1 and "only 3 optimizer steps" in warnings[0]
    # The reference cache line is printed once per table (train, eval), not twice.
    cache_lines = [x for x in err.replace("\r", "\n").splitlines() if "computed and cached" in x]
    assert len(cache_lines) == 2 and "(train)" in cache_lines[0] and "(eval)" in cache_lines[1]

    # 24 steps at the smoke config's rate move the tiny policy by far more than 0.01 nats: no warning.
    assert cli(["train", *base, f"train.output_dir={tmp_path / 'long'}", "train.max_steps=24"]) == 0
    err = capsys.readouterr().err
    (line,) = _summary(err)
    assert line.startswith("summary: 24 optimizer steps;")
    last = [r for r in read_metrics(tmp_path / "long") if "loss" in r][-1]
    assert abs(last["kl/batch"]) > MIN_KL and "warning: this run" not in err
    assert "loaded from cache" in err  # same data and model as the first run: the reference table is reused


def test_sft_ends_with_the_summary(tmp_path, capsys):
    assert cli(["sft", "--config", str(SFT_SMOKE), f"train.output_dir={tmp_path / 'sft'}", "train.max_steps=2",
                "train.save_every=0", "data.eval_fraction=0", "train.log_every=1", "data.max_length=40"]) == 0
    err = capsys.readouterr().err
    (line,) = _summary(err)
    recs = [r for r in read_metrics(tmp_path / "sft") if "loss" in r]
    assert line == f"summary: 2 optimizer steps; loss {recs[0]['loss']:.4g} → {recs[-1]['loss']:.4g}"
    assert "warning: this run cannot have changed the model much: only 2 optimizer steps" in err
