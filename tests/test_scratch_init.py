"""Issue 12 item 13: a scratch model that cannot be built or run is one ``error:`` line, exit 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from exoalign.cli import main as cli

REPO = Path(__file__).resolve().parents[1]
PAIRS = REPO / "configs" / "data" / "toy_pairs.jsonl"

CASES = [
    # (overrides, the field named, what the line says)
    (["model.model_type=t5"], "model.model_type", "'t5' is not a model_type with a causal-LM head"),
    (["model.model_type=nosuch"], "model.model_type", "unknown model_type"),
    (["model.model_type=lama"], "model.model_type", "close: llama"),
    (["model.model_type=gptj", "model.scratch_config={n_layer: 1, n_embd: 32, n_head: 4, rotary_dim: 64}"],
     "model.scratch_config", "cannot run"),
    (["model.model_type=llama", "model.scratch_config={n_layer: 1}"], "model.scratch_config",
     "did you mean 'num_hidden_layers'?"),
    (["model.model_type=gpt2", "model.scratch_config={n_layer: two}"], "model.scratch_config", "cannot build"),
]


@pytest.mark.parametrize(("extra", "field", "needle"), CASES, ids=lambda v: str(v)[:50])
@pytest.mark.parametrize("command", ["train", "sft"])
def test_bad_scratch_model_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, extra, field, needle, command):
    data = REPO / "configs" / "data" / ("toy_pairs.jsonl" if command == "train" else "toy_sft.jsonl")
    argv = [command, "model.init=scratch", f"data.train_file={data}", "data.max_length=32", "data.max_prompt_length=16",
            "train.cpu=true", "train.max_steps=1", f"train.output_dir={tmp_path / 'run'}"]
    if command == "train":
        argv.append(f"train.ref_cache_dir={tmp_path / 'cache'}")
    assert cli(argv + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert f"field '{field}'" in err[0] and needle in err[0] and "Fix:" in err[0], err[0]
    assert list(tmp_path.iterdir()) == []  # no output_dir, no init, no cache entry


def test_reward_model_of_a_type_without_a_classification_head(tmp_path, capsys):
    groups = REPO / "configs" / "data" / "toy_groups.jsonl"
    argv = ["rm", "train", "model.init=scratch", "model.model_type=t5", f"data.train_file={groups}",
            "train.cpu=true", f"train.output_dir={tmp_path / 'run'}"]
    assert cli(argv) == 2
    line = capsys.readouterr().err.strip()
    assert "field 'model.model_type'" in line and "reward head" in line
    assert list(tmp_path.iterdir()) == []
