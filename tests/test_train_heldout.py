"""Held-out reward and KL(π_θ‖π_sft) while training (``output_dir/eval.jsonl``): online with ``online.eval_every``,
offline with ``train.eval_every``; the points are ``exoalign eval``'s, ``exoalign plot frontier`` draws them, and
evaluating does not change the training; an online run ends with its ``summary:`` line."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from numerics import rel_tol
from safetensors.torch import load_file
from transformers import AutoConfig

from exoalign.config import load_config
from exoalign.eval import evaluate as ev
from exoalign.eval.heldout import read_points, shard
from exoalign.eval.plots import frontier
from exoalign.online import rounds as online
from exoalign.train.config import TrainConfig
from exoalign.train.engine import read_metrics
from exoalign.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
HELD = ROOT / "configs" / "data" / "toy_sft.jsonl"  # 8 distinct prompts
ORACLE = '''
def f(prompts, completions):
    return [10.0 * c.count("e") / (1 + len(c)) for c in completions]
'''


def _online(tmp_path: Path, name: str, *extra: str) -> TrainConfig:
    (tmp_path / "oracle.py").write_text(ORACLE, encoding="utf-8")
    base = [f"train.output_dir={tmp_path / name}", f"train.ref_cache_dir={tmp_path / 'cache'}", "train.log_every=1",
            "train.warmup_steps=0", "train.lr=1e-3", "data.eval_fraction=0", "loss.beta_pi=1.0", "online.rounds=3",
            "online.k=4", "online.prompts_per_round=8", "online.steps_per_round=1", "online.max_new_tokens=12",
            "online.generation_batch_size=8", "train.ref_batch_size=16", f"online.oracle={tmp_path / 'oracle.py'}:f"]
    return load_config(TrainConfig, SMOKE, base + list(extra))


def test_shards_are_contiguous_and_cover_everything():
    for n in (0, 1, 7, 8, 9):
        for world in (1, 2, 3):
            parts = [list(shard(n, r, world)) for r in range(world)]
            assert sum(parts, []) == list(range(n))


def test_online_eval_every_round_writes_four_points_the_frontier_draws(tmp_path, caplog):
    """rounds=3, eval_every=1 → points at steps 0 (π_sft, KL exactly 0: the same weights score the same ids) and
    1, 2, 3; ``plot frontier`` reads the JSONL and draws π_sft plus the run's 3 points; the last point is exactly
    what ``exoalign eval`` reports for ``final`` with the same settings (same code, seeds and batches)."""
    with caplog.at_level(logging.INFO, logger="exoalign"):
        final = train(_online(tmp_path, "run", "online.eval_every=1", f"data.eval_file={HELD}"))
    run = final.parent
    points = [p["results"][0] for p in read_points(run)]
    assert [p["step"] for p in points] == [0, 1, 2, 3]
    assert points[0]["kl"] == 0.0 and points[0]["kl_k3"] == 0.0 and points[0]["checkpoint"] == str(run / "init")
    assert points[-1]["kl_k3"] > 0  # k1 may be negative on 16 samples; every k3 term is >= 0
    assert all(p["n_prompts"] == 8 and p["samples_per_prompt"] == 2 for p in points)
    png, md = frontier([str(run / "eval.jsonl")], str(tmp_path / "f.png"))
    rows = [r for r in md.read_text(encoding="utf-8").splitlines() if r.startswith("| ") and "---" not in r][1:]
    assert len(rows) == 4 and rows[0].startswith("| π_sft") and png.stat().st_size > 0
    # Per-round records carry the point; the run ends with the online summary line.
    rounds = [r for r in read_metrics(run) if "online/round" in r]
    assert [r["heldout/reward"] for r in rounds] == [p["reward"]["mean"] for p in points[1:]]
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("summary:"))
    assert line.startswith("summary: 3 rounds (3 optimizer steps); reward ")
    assert "ESS of the targets" in line and "held-out reward" in line and "(step 0 → 3)" in line

    cfg = ev.EvalConfig(checkpoints=[str(final)], sft_model=str(run / "init"), prompts=str(HELD),
                        oracle=f"{tmp_path / 'oracle.py'}:f", samples_per_prompt=2, temperature=1.0,
                        max_new_tokens=12, max_prompt_length=16, seed=0, batch_size=8, logp_batch_size=16,
                        win_rate=False, backend="hf", device="cpu", output=str(tmp_path / "e.json"))
    got = json.loads(ev.run(cfg).read_text(encoding="utf-8"))["results"][0]
    # Same sampler, seeds and weights (saved fp32 = in-memory fp32): the same samples, so the same lengths and
    # rewards exactly; the KL's log-probs come from the sampler's own decode in one and a forward pass in the
    # other, which differ by fp32 rounding: rel_tol over the vocabulary, of log-probs up to 12 tokens × log V.
    for key in ("length", "finished"):
        assert got[key] == points[-1][key], key
    assert got["reward"] == points[-1]["reward"]
    vocab = AutoConfig.from_pretrained(final).vocab_size
    tol = rel_tol(torch.float32, vocab) * 12 * math.log(vocab)
    for key in ("kl", "kl_k3"):
        assert abs(got[key] - points[-1][key]) <= tol, (key, got[key], points[-1][key], tol)


def test_evaluating_does_not_change_the_training(tmp_path):
    """The held-out samples use their own seeded streams and no dropout: the same losses and weights as without."""
    a = train(_online(tmp_path, "with", "online.eval_every=1", f"data.eval_file={HELD}"))
    b = train(_online(tmp_path, "without"))
    assert [r.get("loss") for r in read_metrics(a.parent)] == [r.get("loss") for r in read_metrics(b.parent)]
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not (b.parent / "eval.jsonl").exists()


def test_online_eval_fraction_holds_prompts_out_of_training(tmp_path):
    """data.eval_fraction splits the prompt file: held-out prompts are never sampled in a round; eval_every=0
    evaluates only at the start and the end."""
    final = train(_online(tmp_path, "frac", "data.eval_fraction=0.25", "online.prompts_per_round=6",
                          "data.train_file=configs/data/toy_sft.jsonl"))
    points = [p["results"][0] for p in read_points(final.parent)]
    assert [p["step"] for p in points] == [0, 3] and points[0]["n_prompts"] == 2
    record = json.loads((final.parent / "online" / "round-00000.json").read_text())
    assert len(set(record["prompts"])) == 6


def test_offline_train_eval_every_writes_points(tmp_path, caplog):
    """Offline: held-out rows + a judge in online.oracle → points at 0, every train.eval_every steps and the end;
    the held-out loss is still logged; the summary line names the held-out reward."""
    (tmp_path / "oracle.py").write_text(ORACLE, encoding="utf-8")
    cfg = load_config(TrainConfig, SMOKE, [f"train.output_dir={tmp_path / 'off'}", f"train.ref_cache_dir={tmp_path}/c",
                                           "train.max_steps=5", "train.eval_every=2", "train.save_every=0",
                                           "online.max_new_tokens=8", f"online.oracle={tmp_path / 'oracle.py'}:f"])
    with caplog.at_level(logging.INFO, logger="exoalign"):
        final = train(cfg)
    points = [p["results"][0] for p in read_points(final.parent)]
    assert [p["step"] for p in points] == [0, 2, 4, 5]
    assert points[0]["kl"] == 0.0 and points[-1]["kl"] != 0.0
    assert any("eval/loss" in r for r in read_metrics(final.parent))
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("summary:"))
    assert "held-out reward" in line and "(step 0 → 5)" in line


class _Killed(BaseException):
    """Stands for SIGKILL: no ``except Exception`` on the way cleans anything up."""


def test_a_resumed_run_keeps_the_points_up_to_its_checkpoint(tmp_path, monkeypatch):
    """Killed in the third round's training step (after the step-2 checkpoint and point) and resumed: the same
    points as an uninterrupted run, each once (the resumed run keeps steps 0–2 and writes step 3)."""
    extra = ("online.eval_every=1", f"data.eval_file={HELD}")
    whole = train(_online(tmp_path, "whole", *extra))
    real, calls = online.compute_loss, [0]

    def dies(*a, **kw):
        if torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] == 3:
                raise _Killed
        return real(*a, **kw)

    monkeypatch.setattr(online, "compute_loss", dies)
    with pytest.raises(_Killed):
        train(_online(tmp_path, "cut", *extra))
    monkeypatch.setattr(online, "compute_loss", real)
    assert [p["results"][0]["step"] for p in read_points(tmp_path / "cut")] == [0, 1, 2]
    resumed = train(_online(tmp_path, "cut", *extra, "train.resume=true"))
    got = [p["results"][0] for p in read_points(resumed.parent)]
    want = [p["results"][0] for p in read_points(whole.parent)]
    assert [p["step"] for p in got] == [0, 1, 2, 3]
    for g, w in zip(got, want):  # exact resume: the same weights at every step, hence the same numbers
        assert (g["kl"], g["kl_k3"], g["reward"]) == (w["kl"], w["kl_k3"], w["reward"])
