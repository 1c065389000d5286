"""Training runs on the bundled toy problem: learning, saving/reloading, the reference cache, accumulation,
exact resume, torn checkpoints, NaN handling."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from exoalign.config import load_config
from exoalign.data import GroupCollator, tokenize_rows
from exoalign.errors import ConfigError
from exoalign.models import load_tokenizer
from exoalign.train import checkpoint, engine, trainer
from exoalign.train.config import TrainConfig
from exoalign.train.engine import TrainingError, read_metrics
from exoalign.train.loop import load_preference_data, train
from exoalign.train.step import grouped_logps

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"



def make_cfg(tmp_path: Path, *overrides: str, name: str = "run") -> TrainConfig:
    """The smoke config, shortened, writing under ``tmp_path``, with a private reference cache."""
    base = [f"train.output_dir={tmp_path / name}", f"train.ref_cache_dir={tmp_path / 'cache'}", "train.max_steps=6",
            "train.log_every=1", "train.save_every=0", "data.max_length=40", "train.warmup_steps=0"]
    return load_config(TrainConfig, SMOKE, base + list(overrides))


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run) if "loss" in r]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize(
    ("loss", "target"), [("exo", "pref"), ("dpo", "pref"), ("exo", "rw"), ("dpo", "rw")]
)
def test_learns_the_toy_preference(tmp_path, loss, target):
    """Accuracy and the implicit reward margin rise; the held-out accuracy is high; the weights moved."""
    extra = ["data.train_file=configs/data/toy_groups.jsonl", "loss.target=rw", "data.k=4"] if target == "rw" else []
    cfg = make_cfg(tmp_path, f"loss.name={loss}", "train.max_steps=24", *extra)
    final = train(cfg)
    recs = [r for r in read_metrics(final.parent) if "loss" in r]
    assert len(recs) == 24
    first, last = recs[:2], recs[-4:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)
    assert mean(first, "rewards/accuracies") < 0.8
    assert mean(last, "rewards/accuracies") >= 0.9
    assert mean(last, "rewards/margins") > mean(first, "rewards/margins") + 1.0
    assert mean(last, "loss") < mean(first, "loss")
    held = read_metrics(final.parent)[-1]
    assert held["eval/rewards/accuracies"] >= 0.75
    for key in ("logps/chosen", "logps/rejected", "kl/batch", "grad_norm", "perf/tokens_per_s", "perf/step_s", "lr"):
        assert key in recs[-1] and math.isfinite(recs[-1][key])
    init, trained = weights(final.parent / "init"), weights(final)
    moved = [k for k in trained if not torch.equal(init[k], trained[k])]
    assert len(moved) == len(trained)


def test_final_reloads_with_the_same_logps(tmp_path):
    """``final`` loads with AutoModelForCausalLM.from_pretrained and reproduces the held-out log-probs that the
    in-memory model logged (``eval/logps/chosen``) at the end of training."""
    cfg = make_cfg(tmp_path, "train.max_steps=8")
    final = train(cfg)
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    tok = load_tokenizer(str(final))
    _, held = load_preference_data(cfg, tok)
    data = tokenize_rows(held, tok, max_length=40, max_prompt_length=16)
    batch = GroupCollator(tok.pad_token_id)(list(data))
    with torch.no_grad():
        logps = grouped_logps(model, batch)[0]  # (12, 2)
    logged = read_metrics(final.parent)[-1]
    assert float(logps[:, 0].mean()) == pytest.approx(logged["eval/logps/chosen"], abs=1e-3)
    assert float(logps[:, 1].mean()) == pytest.approx(logged["eval/logps/rejected"], abs=1e-3)
    assert json.loads((final / "config.json").read_text())["model_type"] == "gpt2"


def test_reference_cache_hit_and_online_reference_agree(tmp_path):
    first = train(make_cfg(tmp_path, name="a")).parent
    second = train(make_cfg(tmp_path, name="b")).parent
    online = train(make_cfg(tmp_path, "train.ref_mode=online", name="c")).parent
    info = [json.loads((run / "run_info.json").read_text()) for run in (first, second)]
    assert info[0]["ref_cache"]["train_hit"] is False and info[1]["ref_cache"]["train_hit"] is True
    assert info[1]["ref_cache"]["eval_hit"] is True
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2  # train + held-out tables
    assert losses(first) == losses(second)
    assert losses(online) == pytest.approx(losses(first), abs=1e-5)
    # A different temperature is another cache entry.
    train(make_cfg(tmp_path, "loss.temperature=0.8", "train.max_steps=1", name="d"))
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 4


def test_batch_times_accumulation_equivalence(tmp_path):
    """Batch 8 × accumulation 1 and batch 4 × accumulation 2 take the same steps."""
    a = train(make_cfg(tmp_path, "train.batch_size=8", "train.max_steps=4", name="a"))
    b = train(make_cfg(tmp_path, "train.batch_size=4", "train.grad_accum=2", "train.max_steps=4", name="b"))
    assert losses(b.parent) == pytest.approx(losses(a.parent), abs=1e-5)
    wa, wb, w0 = weights(a), weights(b), weights(a.parent / "init")
    # Adam divides by sqrt(v): float noise in near-zero gradients moves weights by ~1e-5, while training moved
    # every tensor by ~1e-2.
    for k in wa:
        assert (wa[k] - wb[k]).abs().max() < 1e-4
        assert (wa[k] - w0[k]).abs().max() > 1e-3


class _Killed(Exception):
    pass


def test_resume_equals_uninterrupted(tmp_path, monkeypatch, caplog):
    """Stopped right after the step-5 checkpoint (inside an epoch, mid LR schedule) and resumed: the same loss
    log and the same weights as a run that was never interrupted. Torn checkpoints are skipped."""
    steps = ["train.max_steps=14", "train.save_every=5", "train.warmup_steps=3", "train.grad_accum=2",
             "train.batch_size=4"]
    whole = train(make_cfg(tmp_path, *steps, name="whole"))

    real_save = checkpoint.save_checkpoint

    def save_then_die(*args, **kwargs):
        path = real_save(*args, **kwargs)
        if path.name == "checkpoint-5":
            raise _Killed
        return path

    monkeypatch.setattr(engine, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        train(make_cfg(tmp_path, *steps, name="cut"))
    monkeypatch.setattr(engine, "save_checkpoint", real_save)
    cut = tmp_path / "cut"
    assert [r["step"] for r in read_metrics(cut)] == [1, 2, 3, 4, 5]
    (cut / "checkpoint-9").mkdir()  # a torn checkpoint: no COMPLETE marker
    (cut / "checkpoint-9" / "model.safetensors").write_bytes(b"half")
    (cut / ".tmp-checkpoint-7").mkdir()  # a save killed mid-write
    with open(cut / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 123.0}\n{"step": 7, "lo')  # log lines written after the checkpoint

    logging.getLogger("exoalign").propagate = True
    with caplog.at_level(logging.WARNING, logger="exoalign.train.checkpoint"):
        resumed = train(make_cfg(tmp_path, *steps, "train.resume=true", name="cut"))
    assert any("torn checkpoint" in r.message and "checkpoint-9" in r.message for r in caplog.records)
    assert losses(cut) == pytest.approx(losses(whole.parent), abs=1e-6)
    assert [r["step"] for r in read_metrics(cut) if "loss" in r] == list(range(1, 15))
    ww, wr = weights(whole), weights(resumed)
    assert all(torch.allclose(ww[k], wr[k], atol=1e-6) for k in ww)
    assert not (cut / ".tmp-checkpoint-7").exists()


def test_existing_run_needs_resume_and_a_finished_run_resumes_to_itself(tmp_path):
    final = train(make_cfg(tmp_path, "train.max_steps=2"))
    before = read_metrics(final.parent)
    init_time = (final.parent / "init" / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(ConfigError, match="--resume"):
        train(make_cfg(tmp_path, "train.max_steps=2"))
    assert (final.parent / "init" / "model.safetensors").stat().st_mtime_ns == init_time  # refused before any work
    again = train(make_cfg(tmp_path, "train.max_steps=2", "train.resume=true"))
    assert read_metrics(again.parent) == before  # nothing re-run, nothing logged twice
    assert all(torch.equal(a, b) for a, b in zip(weights(final).values(), weights(again).values()))


def test_nan_loss_stops_or_is_skipped(tmp_path, monkeypatch):
    real = trainer.compute_loss
    calls = {"n": 0}

    def nan_on_third(model, batch, cfg, ref_model=None, **kw):
        calls["n"] += 1
        loss, metrics = real(model, batch, cfg, ref_model, **kw)
        if calls["n"] == 3:
            loss = loss * float("nan")
        return loss, metrics

    monkeypatch.setattr(trainer, "compute_loss", nan_on_third)
    with pytest.raises(TrainingError) as err:
        train(make_cfg(tmp_path, "train.save_every=2", name="stop"))
    msg = str(err.value)
    assert "step 3" in msg and "train.lr" in msg and "bf16" in msg and "nan_policy=skip" in msg
    assert [p.name for _, p in checkpoint.list_checkpoints(tmp_path / "stop")] == ["checkpoint-2"]
    assert not (tmp_path / "stop" / "final").exists()

    calls["n"] = 0
    final = train(make_cfg(tmp_path, "train.nan_policy=skip", name="skip"))
    recs = [r for r in read_metrics(final.parent) if "lr" in r]  # the per-step records
    assert [r["nonfinite_skipped"] for r in recs] == [0, 0, 1, 1, 1, 1]
    assert "loss" not in recs[2] and "grad_norm" not in recs[2]  # the skipped update logs no loss
    assert all("loss" in r for i, r in enumerate(recs) if i != 2)
    assert all(torch.isfinite(w).all() for w in weights(final).values())


def test_lora_reference_is_the_adapterless_model(tmp_path):
    """With LoRA the reference is the policy with adapters disabled: cached and online agree, only adapters
    train, and ``final`` holds merged weights that plain ``from_pretrained`` loads."""
    pytest.importorskip("peft")
    cached = train(make_cfg(tmp_path, "model.lora_r=4", "model.lora_target_modules=[c_attn]", name="a"))
    online = train(make_cfg(tmp_path, "model.lora_r=4", "model.lora_target_modules=[c_attn]",
                            "train.ref_mode=online", name="b"))
    assert losses(online.parent) == pytest.approx(losses(cached.parent), abs=1e-5)
    assert losses(cached.parent)[-1] < losses(cached.parent)[0]
    init, merged = weights(cached.parent / "init"), weights(cached)
    assert set(merged) == set(init)  # no lora_A / lora_B keys left
    changed = {k for k in init if not torch.equal(init[k], merged[k])}
    assert changed == {f"transformer.h.{i}.attn.c_attn.weight" for i in range(2)}
    model = AutoModelForCausalLM.from_pretrained(cached)
    assert type(model).__name__ == "GPT2LMHeadModel"


def test_bf16_autocast_runs(tmp_path, monkeypatch):
    """bf16 autocast keeps fp32 masters; a CPU run asks for glibc's kept memory, and where the CPU has no bf16
    units (forced here) the run warns once that bf16 is slow (exoalign.hardware)."""
    from exoalign import hardware

    kept, warned = [], []
    monkeypatch.setattr(engine, "keep_freed_memory", lambda: kept.append(1) or True)
    monkeypatch.setattr(hardware, "fast_bf16", lambda device="cpu": False)
    monkeypatch.setattr(hardware, "_warned", set())
    monkeypatch.setattr(hardware.log, "warning", lambda *a: warned.append(a[1]))
    final = train(make_cfg(tmp_path, "train.mixed_precision=bf16", "train.max_steps=3"))
    recs = [r for r in read_metrics(final.parent) if "loss" in r]
    assert len(recs) == 3 and all(math.isfinite(r["loss"]) for r in recs)
    assert all(w.dtype == torch.float32 for w in weights(final).values())  # autocast: fp32 master weights
    assert kept == [1] and warned == ["train.mixed_precision=bf16"]


def test_bf16_loss_curve_equals_fp32_over_50_steps(tmp_path):
    """bf16 autocast with fp32 master weights and optimiser state follows the fp32 run's loss curve for 50 steps.

    Both runs start from the same weights and see the same batches. Under autocast the matmuls round their
    inputs to bf16 (eps 2^-7), so each step's loss differs from fp32's by rounding of that order, relative to
    the loss's scale; with fp32 masters the small updates are not lost and the two trajectories stay within
    eps_bf16·max|L| of each other (measured here: largest gap 8e-4 against a tolerance of 0.022). Training the
    weights themselves in bf16 (``model.dtype=bfloat16``: no fp32 masters) drifted to a gap of 0.036 by step 50
    in the same setting, so the bound separates the two. The bf16 run must also differ from the fp32 one
    somewhere (autocast really ran) and both must learn.
    """
    from numerics import rel_tol

    common = ("train.max_steps=50", "train.lr=3e-4")
    fp32 = losses(train(make_cfg(tmp_path, *common, name="fp32")).parent)
    bf16_final = train(make_cfg(tmp_path, *common, "train.mixed_precision=bf16", name="bf16"))
    bf16 = losses(bf16_final.parent)
    assert len(fp32) == len(bf16) == 50
    assert all(math.isfinite(x) for x in bf16)
    scale = max(abs(x) for x in fp32)
    tol = rel_tol(torch.bfloat16, 1, safety=1.0) * scale
    gaps = [abs(a - b) for a, b in zip(fp32, bf16)]
    worst = max(range(50), key=gaps.__getitem__)
    assert gaps[worst] <= tol, f"step {worst}: fp32 {fp32[worst]:.6f} vs bf16 {bf16[worst]:.6f} (tolerance {tol:.4f})"
    assert max(gaps) > 0, "the bf16 run equals the fp32 run exactly: autocast did not run"
    assert sum(bf16[-10:]) / 10 < 0.5 * sum(bf16[:5]) / 5  # it learns, as fp32 does
    assert all(w.dtype == torch.float32 for w in weights(bf16_final).values())  # fp32 masters saved


def test_final_links_the_last_checkpoints_weights(tmp_path):
    """With a checkpoint at the last step (kept for evaluation), ``final`` hard-links its files instead of writing
    the same weights again; it stays whole when the checkpoint is deleted, and says it is final."""
    import shutil

    final = train(make_cfg(tmp_path, "train.max_steps=4", "train.save_every=2", "train.keep_checkpoint_weights=true"))
    last = final.parent / "checkpoint-4"
    assert (last / "COMPLETE").is_file() and (final / "COMPLETE").is_file()
    assert (final / "model.safetensors").samefile(last / "model.safetensors")
    assert json.loads((final / "trainer_state.json").read_text())["final"] is True
    assert "final" not in json.loads((last / "trainer_state.json").read_text())
    expected = weights(last)
    shutil.rmtree(last)
    got = weights(final)
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in got)
    assert AutoModelForCausalLM.from_pretrained(final) is not None


def test_clipping_folded_into_fused_adamw_takes_the_same_steps(tmp_path, monkeypatch):
    """The fused AdamW kernel applies the clip (grad_scale = 1 / c) instead of a separate pass over the gradients:
    the same losses, norms and weights as clip_grad_norm_ followed by the step, with clipping active every step."""
    seen = []
    real = engine._clip_scale

    def spy(params, max_norm):
        norm, scale = real(params, max_norm)
        seen.append((float(norm), scale is not None))
        return norm, scale

    monkeypatch.setattr(engine, "_clip_scale", spy)
    cfg = ["train.max_steps=5", "train.max_grad_norm=0.05"]
    folded = train(make_cfg(tmp_path, *cfg, name="folded"))
    assert len(seen) == 5 and all(clipped and norm > 0.05 for norm, clipped in seen)
    monkeypatch.setattr(engine, "_can_fold_clip", lambda *a: None)
    plain = train(make_cfg(tmp_path, *cfg, name="plain"))
    assert len(seen) == 5  # the plain run clipped through accelerate
    rec = {name: [r for r in read_metrics(run.parent) if "loss" in r] for name, run in (("f", folded), ("p", plain))}
    # g / (1 / c) and g · c differ by a rounding of the quotient; Adam's steps of ~lr then differ by ~1e-7 relative.
    assert [r["grad_norm"] for r in rec["f"]] == pytest.approx([r["grad_norm"] for r in rec["p"]], rel=1e-4)
    assert [r["loss"] for r in rec["f"]] == pytest.approx([r["loss"] for r in rec["p"]], abs=1e-5)
    wf, wp, w0 = weights(folded), weights(plain), weights(folded.parent / "init")
    for k in wf:
        assert (wf[k] - wp[k]).abs().max() < 1e-5, k
    assert max(float((wf[k] - w0[k]).abs().max()) for k in wf) > 1e-4
