"""`exoalign train` on published datasets as they are (issue 21, "Done when"): hh-rlhf, raw UltraFeedback (K = 4
with scores: listwise EXO with rw targets) and ultrafeedback_binarized with scores, through data.preset=... or
data.columns=...; and a CSV file. Two optimizer steps each on the tiny model of configs/smoke.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_data_presets import ISSUE_COLUMNS, SENTENCES, binarized_rows, hh_rows, ultrafeedback_rows

from exoalign.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


def _train(tmp_path: Path, capsys, *overrides: str) -> list[dict]:
    """Run `exoalign train` on the smoke config for 2 steps; the metrics it logged."""
    out = tmp_path / "run"
    argv = ["train", "--config", str(SMOKE), f"train.output_dir={out}", f"train.ref_cache_dir={tmp_path / 'cache'}",
            "train.max_steps=2", "train.log_every=1", "train.save_every=100", "data.eval_fraction=0",
            "train.batch_size=4", *overrides]
    rc = cli(argv)
    err = capsys.readouterr().err
    assert rc == 0, err[-2000:]
    assert (out / "final").is_dir() and "summary: 2 optimizer steps" in err, err[-2000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_hh_rlhf_rows_train_with_the_preset(tmp_path, capsys):
    data = _write(tmp_path / "hh.jsonl", hh_rows(16))
    _train(tmp_path, capsys, f"data.train_file={data}", "data.preset=hh-rlhf")


def test_raw_ultrafeedback_trains_listwise_exo_on_rw_targets_through_columns(tmp_path, capsys):
    """K = 4 completions with scores; the column map written on the command line exactly as in the issue."""
    data = _write(tmp_path / "uf.jsonl", ultrafeedback_rows(16))
    metrics = _train(tmp_path, capsys, f"data.train_file={data}", f"data.columns={ISSUE_COLUMNS}",
                     "loss.name=exo", "loss.target=rw")
    assert all(m["loss"] == m["loss"] for m in metrics if "loss" in m)  # finite, not NaN


def test_ultrafeedback_binarized_with_scores_trains_with_the_preset(tmp_path, capsys, tiny_model_dir, chat_tokenizer):
    """Its rows are conversations, so the model needs a chat template: the tiny model with one."""
    model = tmp_path / "chat-model"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(model)
    chat_tokenizer.save_pretrained(model)
    data = _write(tmp_path / "ufb.jsonl", binarized_rows(16))
    _train(tmp_path, capsys, "model.init=pretrained", f"model.name_or_path={model}", f"data.train_file={data}",
           "data.preset=ultrafeedback-binarized", "loss.target=rw")


def test_a_csv_file_trains(tmp_path, capsys):
    data = tmp_path / "pairs.csv"
    lines = ["prompt,chosen,rejected"] + [f"review {i},{SENTENCES[i % 4]},{SENTENCES[(i + 1) % 4]}" for i in range(16)]
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    _train(tmp_path, capsys, f"data.train_file={data}")


def test_a_near_miss_schema_fails_naming_the_preset_before_any_work(tmp_path, capsys):
    data = _write(tmp_path / "uf.jsonl", ultrafeedback_rows(4))
    rc = cli(["train", "--config", str(SMOKE), f"data.train_file={data}", f"train.output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "data.preset=ultrafeedback" in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("override", "fix"), [("data.preset=hh_rlhf", "did you mean 'hh-rlhf'"),
                                                ("data.columns={prompt: a[x]}", "cannot read the path")])
def test_bad_preset_or_columns_is_a_config_error(tmp_path, capsys, override, fix):
    rc = cli(["train", "--config", str(SMOKE), override, f"train.output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and fix in err and "data." in err, err


def test_sample_reads_prompts_through_a_preset_and_a_column_map(tmp_path, capsys, tiny_model_dir):
    data = _write(tmp_path / "uf.jsonl", ultrafeedback_rows(3))
    outs = []
    for i, how in enumerate(["preset=ultrafeedback", "columns={prompt: instruction}"]):
        out = tmp_path / f"s{i}.jsonl"
        rc = cli(["sample", f"model={tiny_model_dir}", f"prompts={data}", f"output={out}", "k=2", "max_new_tokens=4",
                  "device=cpu", how])
        assert rc == 0, capsys.readouterr().err[-2000:]
        outs.append([json.loads(line) for line in out.read_text().splitlines()])
    assert [r["prompt"] for r in outs[0]] == ["review film 0", "review film 1", "review film 2"]
    assert outs[0] == outs[1]
