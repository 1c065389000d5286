"""A run of a few steps over a larger dataset scores the reference only on the rows it will read."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_train_loop import losses, make_cfg

from exoalign.train import trainer
from exoalign.train.config import LossConfig
from exoalign.train.engine import EpochSampler, planned_rows
from exoalign.train.loop import train
from exoalign.train.step import compute_loss


def test_planned_rows_follow_the_epoch_order():
    order = list(EpochSampler(100, seed=3))
    assert planned_rows(100, 3, batch_size=4, grad_accum=2, num_processes=1, max_steps=3) == sorted(order[:24])
    # Two processes take the batches in turn: twice the rows per step.
    assert planned_rows(100, 3, batch_size=4, grad_accum=1, num_processes=2, max_steps=3) == sorted(order[:24])
    # A plan that reaches the epoch's last batch, or runs by epochs, reads every row.
    assert planned_rows(100, 3, batch_size=10, grad_accum=1, num_processes=1, max_steps=10) is None
    assert planned_rows(100, 3, batch_size=10, grad_accum=1, num_processes=1, max_steps=9) == sorted(order[:90])
    assert planned_rows(100, 3, batch_size=4, grad_accum=1, num_processes=1, max_steps=None) is None


def test_the_table_holds_exactly_the_rows_the_run_reads(tmp_path, monkeypatch):
    seen: list[int] = []
    inner = trainer.compute_loss

    def spy(model, batch, *args, **kwargs):
        if model.training:  # training steps; the held-out loss runs in eval mode on its own rows
            seen.extend(batch["index"].tolist())
        return inner(model, batch, *args, **kwargs)

    monkeypatch.setattr(trainer, "compute_loss", spy)
    steps = ("train.max_steps=3", "train.batch_size=4", "train.grad_accum=2")
    run = train(make_cfg(tmp_path, *steps, name="subset")).parent
    monkeypatch.setattr(trainer, "compute_loss", inner)
    assert len(seen) == 24 and len(set(seen)) == 24

    tables = [load_file(str(p))["logps"] for p in (tmp_path / "cache").glob("*.safetensors")]
    train_table = next(t for t in tables if t.shape[0] > 20)  # the held-out table has 12 rows
    scored = torch.nonzero(~torch.isnan(train_table).any(-1)).flatten().tolist()
    assert scored == sorted(seen)  # scored: exactly the rows read; the other 60 are NaN
    assert torch.isnan(train_table).any(-1).sum() == train_table.shape[0] - 24

    # The same steps against a reference model run every step: the same losses.
    online = train(make_cfg(tmp_path, *steps, "train.ref_mode=online", name="online")).parent
    assert losses(online) == pytest.approx(losses(run), abs=1e-5)
    # Same plan: a cache hit. A longer plan: its own entry, not the shorter one's.
    again = train(make_cfg(tmp_path, *steps, name="again")).parent
    assert json.loads((again / "run_info.json").read_text())["ref_cache"]["train_hit"] is True
    longer = train(make_cfg(tmp_path, "train.max_steps=4", "train.batch_size=4", "train.grad_accum=2",
                            name="longer")).parent
    assert json.loads((longer / "run_info.json").read_text())["ref_cache"]["train_hit"] is False


def test_a_row_outside_the_plan_fails_with_the_reason(monkeypatch):
    """A step that reads a row the table did not score says so (never a silent NaN skipped as a bad step)."""
    import exoalign.train.step as step

    monkeypatch.setattr(step, "grouped_logps", lambda *a, **k: (torch.zeros(1, 2, requires_grad=True), torch.ones(1, 2)))
    batch = {"group_mask": torch.ones(1, 2, dtype=torch.bool), "index": torch.tensor([7]),
             "ref_logps": torch.tensor([[float("nan"), float("nan")]])}
    with pytest.raises(RuntimeError, match=r"no reference log-probs for data rows \[7\]"):
        compute_loss(torch.nn.Module(), batch, LossConfig(name="exo", target="pref", beta_pi=0.1, eps=1e-3))


def test_model_identity_is_remembered_until_a_file_changes(tmp_path, monkeypatch):
    """A process hashes a reference's weight files once (the demo's workers start several runs of one reference);
    a changed file (size, times) is hashed again, and a file modified moments ago is never taken from memory."""
    import os
    import time

    from exoalign.train import refcache

    d = tmp_path / "m"
    d.mkdir()
    w = d / "model.safetensors"
    w.write_bytes(b"weights v1")
    (d / "config.json").write_text("{}")
    old = time.time() - 60
    for f in (w, d / "config.json"):
        os.utime(f, (old, old))
    calls = []
    real = refcache._hash_file
    monkeypatch.setattr(refcache, "_hash_file", lambda p, dg: calls.append(p.name) or real(p, dg))
    first = refcache.model_identity(str(d))
    assert refcache.model_identity(str(d)) == first and calls.count("model.safetensors") == 1  # remembered
    w.write_bytes(b"weights v2")  # same size, just now: hashed again, and not remembered while it is fresh
    second = refcache.model_identity(str(d))
    assert second != first and calls.count("model.safetensors") == 2
    assert refcache.model_identity(str(d)) == second and calls.count("model.safetensors") == 3
