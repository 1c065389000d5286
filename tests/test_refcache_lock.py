"""Runs that share a reference cache directory compute a table once, together: each scores the pieces nobody else
holds, and both get the table one run alone computes."""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path

import pytest
import torch

from exoalign.data import load_rows, tokenize_rows
from exoalign.models import build_model, tiny_config, train_bpe_tokenizer
from exoalign.train import refcache
from exoalign.train.config import TrainArgs
from exoalign.train.refcache import MAX_PIECES, entry_lock, ref_logps_table, table_pieces
from exoalign.train.setup import make_accelerator

DATA = Path(__file__).resolve().parents[1] / "configs" / "data"


def test_the_lock_excludes_a_second_holder(tmp_path: Path) -> None:
    path = tmp_path / "cache" / "entry.safetensors"
    inside, release, order = threading.Event(), threading.Event(), []

    def first() -> None:
        with entry_lock(path):
            inside.set()
            release.wait(10)
            order.append("first done")

    def second() -> None:
        with entry_lock(path):
            order.append("second in")

    a = threading.Thread(target=first)
    a.start()
    assert inside.wait(10)
    b = threading.Thread(target=second)
    b.start()
    time.sleep(0.3)
    assert order == []  # the second holder is still waiting
    with entry_lock(path, wait=False) as got:  # a holder that does not wait is told at once
        assert got is False
    release.set()
    a.join(10)
    b.join(10)
    assert order == ["first done", "second in"]
    with entry_lock(path, active=False):  # inactive: no lock file taken, nothing waits
        pass


def _toy(tmp_path: Path, n: int = 6):
    groups = load_rows(DATA / "toy_groups.jsonl", "group")[:n]
    tok = train_bpe_tokenizer([t for r in groups for t in (r["prompt"], *r["completions"])], vocab_size=300,
                              model_max_length=64)
    model = build_model(tiny_config(len(tok), n_positions=64), seed=0, tokenizer=tok).eval()
    data = tokenize_rows(groups, tok, max_length=48, max_prompt_length=16)
    acc = make_accelerator(TrainArgs(output_dir=str(tmp_path / "out")))
    return model, tok, data, acc


def test_table_pieces_are_whole_batches():
    assert table_pieces(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert table_pieces([3, 5, 9], 4) == [[3, 5, 9]]
    many = table_pieces(list(range(1000)), 3)  # 334 batches: pieces of 6 batches, at most MAX_PIECES of them
    assert len(many) <= MAX_PIECES and all(len(p) == 18 for p in many[:-1]) and sum(many, []) == list(range(1000))


def test_two_runs_score_one_table_together(tmp_path: Path, monkeypatch) -> None:
    """Two runs that ask for the same table at once each score pieces the other does not (every row once), and
    get the table one run alone computes, bit for bit; the pieces are gone afterwards and a third run reads it."""
    model, tok, data, acc = _toy(tmp_path)
    scored: dict[str, list[list[int]]] = {"a": [], "b": []}
    real = refcache.compute_table

    def recording(*args, rows=None, **kw):
        scored[threading.current_thread().name].append(list(rows))
        return real(*args, rows=rows, **kw)

    started, b_claimed = threading.Event(), threading.Event()

    def slow_model() -> torch.nn.Module:  # run a holds its first piece until run b has claimed one of its own
        if threading.current_thread().name == "a":
            started.set()
            assert b_claimed.wait(30)
        else:
            b_claimed.set()
        return copy.deepcopy(model)  # each run its own model, as each process has (a forward is not thread-safe)

    kw = dict(model_id="toy", tokenizer=tok, settings={}, batch_size=2, temperature=1.0)
    alone, hit = ref_logps_table(acc, data, cache_dir=tmp_path / "alone", get_model=lambda: model, **kw)
    one_pass = refcache.compute_table(acc, model, data, tok.pad_token_id, batch_size=2, temperature=1.0)
    assert hit is False and torch.equal(alone, one_pass)  # piece by piece = the whole table in one pass
    monkeypatch.setattr(refcache, "compute_table", recording)
    results: dict[str, tuple[torch.Tensor, bool]] = {}

    def run(name: str) -> None:
        results[name] = ref_logps_table(acc, data, cache_dir=tmp_path / "cache", get_model=slow_model, **kw)

    a = threading.Thread(target=run, args=("a",), name="a")
    a.start()
    assert started.wait(30)
    b = threading.Thread(target=run, args=("b",), name="b")
    b.start()
    a.join(60)
    b.join(60)
    assert scored["a"] and scored["b"]  # both scored
    rows = sorted(r for piece in scored["a"] + scored["b"] for r in piece)
    assert rows == list(range(len(data)))  # every row once
    assert results["a"][1] is False and results["b"][1] is False
    assert torch.equal(results["a"][0], alone) and torch.equal(results["b"][0], alone)
    assert not list((tmp_path / "cache").glob("*.parts"))
    third, hit = ref_logps_table(acc, data, cache_dir=tmp_path / "cache", get_model=lambda: model, **kw)
    assert hit is True and torch.equal(third, alone) and len(scored["a"] + scored["b"]) == 3


@pytest.mark.parametrize("rows", [None, [0, 2, 3, 5]])
def test_the_pieces_of_a_run_that_stopped_are_used(tmp_path: Path, monkeypatch, rows) -> None:
    """A run killed after scoring some pieces (before it wrote the entry) leaves them: the next run scores only
    the rest and gets the table one run alone computes; a subset of rows (a run of a few steps) works the same."""
    model, tok, data, acc = _toy(tmp_path)
    kw = dict(model_id="toy", tokenizer=tok, settings={}, batch_size=2, temperature=1.0, get_model=lambda: model)
    alone, _ = ref_logps_table(acc, data, cache_dir=tmp_path / "alone", rows=rows, **kw)
    real_save, real_compute = refcache.save_cached, refcache.compute_table

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(refcache, "save_cached", killed)
    with pytest.raises(KeyboardInterrupt):
        ref_logps_table(acc, data, cache_dir=tmp_path / "cache", rows=rows, **kw)
    monkeypatch.setattr(refcache, "save_cached", real_save)
    (parts,) = (tmp_path / "cache").glob("*.parts")
    (parts / "0.safetensors").unlink()  # as if it had stopped while scoring the first piece
    calls: list[list[int]] = []

    def recording(*args, rows=None, **kwargs):
        calls.append(list(rows))
        return real_compute(*args, rows=rows, **kwargs)

    monkeypatch.setattr(refcache, "compute_table", recording)
    table, hit = ref_logps_table(acc, data, cache_dir=tmp_path / "cache", rows=rows, **kw)
    assert calls == [[0, 1] if rows is None else [0, 2]] and hit is False
    assert torch.equal(table.isnan(), alone.isnan()) and torch.equal(table.nan_to_num(), alone.nan_to_num())
    assert (rows is None) != bool(table.isnan().any())  # a subset's other rows are NaN
    assert not parts.exists()
