"""Issue 12 item 3: a hub name that cannot be reached fails within seconds, naming the key the user set.

No network is simulated deterministically (whatever the machine has): the hub endpoint is pointed at a closed
local port and the Hugging Face cache at an empty directory, so transformers, left alone, would retry for about
a minute before failing with a message about ``model.tokenizer``.
"""

from __future__ import annotations

import time
from pathlib import Path

import datasets
import pytest
from huggingface_hub import constants

import exoalign.stages.sample  # noqa: F401  (imported here so that the timed calls do not pay for imports)
import exoalign.train.loop  # noqa: F401
from exoalign import hub, models
from exoalign.cli import main as cli

PAIRS = Path(__file__).resolve().parents[1] / "configs" / "data" / "toy_pairs.jsonl"


@pytest.fixture(params=["no-network", "offline-mode"])
def no_hub(request, monkeypatch, tmp_path):
    monkeypatch.setattr(hub, "_HUB_REACHABLE", {})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    if request.param == "no-network":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: connection refused
    else:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return request.param


def _run(argv: list[str], capsys) -> tuple[int, str, float]:
    start = time.perf_counter()
    rc = cli(argv)
    elapsed = time.perf_counter() - start
    return rc, capsys.readouterr().err.strip(), elapsed


def test_unreachable_hub_model_fails_fast_naming_the_field_set(no_hub, tmp_path, capsys):
    out = tmp_path / "run"
    rc, err, elapsed = _run(["train", "model.name_or_path=gpt2", f"data.train_file={PAIRS}", "train.cpu=true",
                             f"train.output_dir={out}", f"train.ref_cache_dir={tmp_path / 'cache'}"], capsys)
    assert rc == 2 and elapsed < 10, (rc, elapsed)
    assert len(err.splitlines()) == 1 and err.startswith("error: gpt2: field 'model.name_or_path'"), err
    assert "model.tokenizer" not in err
    for alternative in ("model.name_or_path=smollm2", "local model directory", "model.init=scratch"):
        assert alternative in err, err
    assert ("HF_HUB_OFFLINE is set" in err) == (no_hub == "offline-mode")
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_unreachable_tokenizer_names_model_tokenizer(no_hub, tmp_path, capsys, tiny_model_dir):
    rc, err, elapsed = _run(["train", f"model.name_or_path={tiny_model_dir}", "model.tokenizer=gpt2",
                             f"data.train_file={PAIRS}", "train.cpu=true", f"train.output_dir={tmp_path / 'run'}"],
                            capsys)
    assert rc == 2 and elapsed < 10
    assert "field 'model.tokenizer'" in err and "model.tokenizer=smollm2" in err, err


def test_sample_names_its_own_key(no_hub, tmp_path, capsys):
    rc, err, elapsed = _run(["sample", "model=gpt2", f"prompts={PAIRS}", f"output={tmp_path / 's.jsonl'}"], capsys)
    assert rc == 2 and elapsed < 10
    assert "field 'model'" in err and "model=smollm2" in err and "model.init" not in err, err
    assert not any(p.name.startswith("s.jsonl") for p in tmp_path.iterdir())


def test_cached_hub_model_loads_without_network_retries(no_hub, monkeypatch):
    """Unreachable hub but a cached snapshot: loading goes straight to the cache (local_files_only)."""
    assert models.hub_kwargs("gpt2") == {"local_files_only": True}
    assert models.hub_kwargs("./some/dir") == {}
    monkeypatch.setattr(models, "in_hub_cache", lambda name: True)
    models.check_hub("gpt2", "model.name_or_path")  # no error: the cache has it


def test_unreachable_hub_dataset_fails_fast(no_hub, tmp_path, capsys, monkeypatch):
    """Issue 21 item 3: a hub dataset name that cannot be reached and is not cached fails at once (no retries)."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "ds-cache"))
    rc, err, elapsed = _run(["train", "model.init=scratch", "data.train_file=someone/no-such-dataset",
                             "train.cpu=true", f"train.output_dir={tmp_path / 'run'}"], capsys)
    assert rc == 2 and elapsed < 10, (rc, elapsed, err)
    assert len(err.splitlines()) == 1 and "'someone/no-such-dataset' cannot be downloaded" in err, err
    assert "not in the local cache" in err and ".csv" in err, err
    assert ("HF_HUB_OFFLINE" in err) == (no_hub == "offline-mode"), err
