"""The trainer's config: shipped YAML loads, bad values are refused early with the key and the fix, the CLI
exits 2 with one line and writes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from exoalign.cli import main as cli_main
from exoalign.config import load_config
from exoalign.errors import ConfigError, InputError
from exoalign.stages.reward_model import RMConfig
from exoalign.stages.sft import SFTConfig
from exoalign.train.config import TrainConfig
from exoalign.train.loop import load_preference_data

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
SFT_SMOKE = ROOT / "configs" / "sft_smoke.yaml"


def test_shipped_configs_load():
    cfg = load_config(TrainConfig, SMOKE)
    assert cfg.model.init == "scratch" and cfg.loss.name == "exo" and cfg.data.train_file.endswith("toy_pairs.jsonl")
    assert load_config(SFTConfig, SFT_SMOKE).data.train_file.endswith("toy_sft.jsonl")
    rm = load_config(RMConfig, SFT_SMOKE, ["data.train_file=configs/data/toy_pairs.jsonl"])
    assert rm.data.eval_fraction == 0.125
    assert load_config(RMConfig).data.eval_fraction == 0.1  # the RM holds out pairs by default
    for f in (ROOT / "configs" / "data").glob("*.jsonl"):
        assert sum(1 for _ in f.open()) >= 64


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("loss.eps=0", "loss.eps"),
        ("loss.eps=0.5", "loss.eps"),
        ("loss.beta_pi=0", "loss.beta_pi"),
        ("loss.beta_r=-1", "loss.beta_r"),
        ("loss.temperature=0", "loss.temperature"),
        ("loss.name=kto", "loss.name"),
        ("loss.target=soft", "loss.target"),
        ("data.k=1", "data.k"),
        ("data.max_prompt_length=60", "data.max_prompt_length"),
        ("train.scheduler=cosinus", "train.scheduler"),
        ("train.lr=-1", "train.lr"),
        ("train.report_to=[tensorbord]", "train.report_to"),
        ("train.lrr=0.1", "train.lrr"),
    ],
)
def test_bad_values_name_the_key(override, field):
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, SMOKE, [override])
    assert err.value.field == field
    assert "Fix:" in str(err.value)


def test_pref_targets_need_pairs():
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, SMOKE, ["data.k=4"])
    assert err.value.field == "data.k" and "loss.target=rw" in str(err.value)
    # K=4 groups with reward targets are fine.
    cfg = load_config(TrainConfig, SMOKE, ["data.k=4", "loss.target=rw"])
    assert cfg.data.k == 4


def test_rw_targets_on_pairs_without_rewards_is_a_config_error():
    cfg = load_config(TrainConfig, SMOKE, ["loss.target=rw"])
    with pytest.raises(ConfigError) as err:
        load_preference_data(cfg, tokenizer=None)
    assert err.value.field == "loss.target" and "toy_pairs.jsonl" in str(err.value)


def test_pref_on_groups_needs_k2_then_orders_best_first():
    cfg = load_config(TrainConfig, SMOKE, ["data.train_file=configs/data/toy_groups.jsonl", "data.eval_fraction=0"])
    with pytest.raises(ConfigError, match="data.k=2"):
        load_preference_data(cfg, tokenizer=None)
    cfg = load_config(TrainConfig, SMOKE, ["data.train_file=configs/data/toy_groups.jsonl", "data.k=2",
                                           "data.eval_fraction=0"])
    rows, held = load_preference_data(cfg, tokenizer=None)
    assert held == [] and len(rows) == 96
    assert all(len(r["completions"]) == 2 and r["rewards"][0] >= r["rewards"][1] for r in rows)
    assert all(r["rewards"] == [2.0, 0.0] for r in rows)  # best_worst of the toy groups


def test_eval_fraction_split_is_disjoint_and_seeded():
    cfg = load_config(TrainConfig, SMOKE)
    a_train, a_eval = load_preference_data(cfg, tokenizer=None)
    b_train, b_eval = load_preference_data(cfg, tokenizer=None)
    assert len(a_eval) == 12 and len(a_train) == 84 and a_eval == b_eval and a_train == b_train
    key = lambda r: (r["prompt"], tuple(r["completions"]))
    assert sorted(map(key, a_train + a_eval)) == sorted(map(key, load_preference_data(
        load_config(TrainConfig, SMOKE, ["data.eval_fraction=0"]), tokenizer=None)[0]))


def test_cli_bad_config_exits_2_with_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli_main(["train", "--config", str(SMOKE), "loss.eps=0", f"train.output_dir={out}"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: command line") and "loss.eps" in err
    assert not out.exists()


def test_cli_bad_row_exits_2_naming_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "", "rejected": "c"}\n')
    out = tmp_path / "run"
    code = cli_main(["train", "--config", str(SMOKE), f"data.train_file={bad}", f"train.output_dir={out}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"{bad}:2" in err and "chosen" in err
    assert not out.exists()


def test_cli_missing_model_is_a_config_error(tmp_path, capsys):
    code = cli_main(["train", "--config", str(SMOKE), "model.init=pretrained", f"train.output_dir={tmp_path}/x"])
    assert code == 2 and "model.name_or_path" in capsys.readouterr().err


def test_help_lists_every_key(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for key in ("data.train_file", "train.resume", "loss.beta_pi", "train.ref_mode", "model.lora_r", "--resume"):
        assert key in text


def test_rm_unknown_subcommand(capsys):
    assert cli_main(["rm", "fit"]) == 2
    assert "exoalign rm train" in capsys.readouterr().err


def test_input_error_is_not_swallowed_by_config_error():
    assert issubclass(ConfigError, InputError)


def test_loss_clip_is_ppo_clip_param():
    """Issue 19 names `loss.clip`: it is the ppo loss's own `clip` parameter, and only ppo has one."""
    from exoalign.errors import ConfigError
    from exoalign.train.config import LossConfig

    assert LossConfig(name="ppo", clip=0.3).params == {"clip": 0.3}
    assert LossConfig(name="ppo").params.get("clip", 0.2) == 0.2
    with pytest.raises(ConfigError, match="no clip range"):
        LossConfig(name="exo", clip=0.3)
    with pytest.raises(ConfigError, match="given twice"):
        LossConfig(name="ppo", clip=0.3, params={"clip": 0.2})
