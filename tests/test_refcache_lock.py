"""Runs that share a reference cache directory compute a table once: a second run waits for the entry and reads it."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch

from exoalign.data import load_rows, tokenize_rows
from exoalign.models import build_model, tiny_config, train_bpe_tokenizer
from exoalign.train.config import TrainArgs
from exoalign.train.refcache import entry_lock, ref_logps_table
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
    release.set()
    a.join(10)
    b.join(10)
    assert order == ["first done", "second in"]
    with entry_lock(path, active=False):  # inactive: no lock file taken, nothing waits
        pass


def test_a_run_that_waited_reads_the_table_the_other_computed(tmp_path: Path) -> None:
    groups = load_rows(DATA / "toy_groups.jsonl", "group")[:6]
    tok = train_bpe_tokenizer([t for r in groups for t in (r["prompt"], *r["completions"])], vocab_size=300,
                              model_max_length=64)
    model = build_model(tiny_config(len(tok), n_positions=64), seed=0, tokenizer=tok).eval()
    data = tokenize_rows(groups, tok, max_length=48, max_prompt_length=16)
    acc = make_accelerator(TrainArgs(output_dir=str(tmp_path / "out")))
    calls: list[str] = []
    started = threading.Event()

    def slow_model() -> torch.nn.Module:  # the first run's reference: slow enough for the second to arrive
        calls.append("model")
        started.set()
        time.sleep(0.5)
        return model

    kw = dict(cache_dir=tmp_path / "cache", model_id="toy", tokenizer=tok, settings={}, batch_size=4, temperature=1.0)
    results: dict[str, tuple[torch.Tensor, bool]] = {}
    a = threading.Thread(target=lambda: results.__setitem__("a", ref_logps_table(acc, data, get_model=slow_model, **kw)))
    a.start()
    assert started.wait(30)
    results["b"] = ref_logps_table(acc, data, get_model=slow_model, **kw)  # waits for a's entry, then reads it
    a.join(60)
    assert calls == ["model"]  # computed once
    assert results["a"][1] is False and results["b"][1] is True
    assert torch.equal(results["a"][0], results["b"][0])
