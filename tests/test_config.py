"""exoalign.config: nested dataclasses from YAML + ``key=value`` overrides, with errors that name file, line, key."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from exoalign.config import config_parser, describe, field_help, load_config, require, save_config
from exoalign.errors import ConfigError


@dataclass
class Optim:
    lr: float = 1e-3
    """Learning rate of AdamW."""
    steps: int = 100
    """Number of optimiser steps."""

    def __post_init__(self) -> None:
        require(
            self.lr > 0, "lr", f"must be > 0 (got {self.lr})", "use a positive learning rate such as 1e-6"
        )


@dataclass
class Cfg:
    name: str = "run"
    """Name of the run."""
    loss: Literal["exo", "dpo"] = "exo"
    """Which loss to train with."""
    tags: list[str] = field(default_factory=list)
    """Free-form tags."""
    seed: int | None = None
    """Random seed (null: random)."""
    bf16: bool = False
    """Train in bfloat16."""
    optim: Optim = field(default_factory=Optim)
    """Optimiser settings."""


def _yaml(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _error(path, overrides=()) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        load_config(Cfg, path, list(overrides))
    return e.value


def test_nested_yaml_and_coercion(tmp_path):
    """Nested sections build nested dataclasses; PyYAML reads ``2e-5`` (no dot) as a string, coerced to float;
    ``3.0`` is accepted for an int; unset fields keep their defaults."""
    path = _yaml(tmp_path, "name: demo\nloss: dpo\nseed: 3.0\ntags: [a, b]\noptim:\n  lr: 2e-5\n")
    cfg = load_config(Cfg, path)
    assert cfg == Cfg(name="demo", loss="dpo", tags=["a", "b"], seed=3, optim=Optim(lr=2e-5, steps=100))
    assert isinstance(cfg.optim.lr, float) and isinstance(cfg.seed, int)


def test_empty_file_and_null_section_give_defaults(tmp_path):
    assert load_config(Cfg, _yaml(tmp_path, "")) == Cfg()
    assert load_config(Cfg, _yaml(tmp_path, "optim:\n", "n.yaml")) == Cfg()


def test_overrides_are_coerced_and_win_over_the_file(tmp_path):
    path = _yaml(tmp_path, "name: demo\noptim:\n  lr: 0.1\n  steps: 5\n")
    cfg = load_config(
        Cfg,
        path,
        ["optim.lr=3e-4", "optim.steps=7", "bf16=yes", "tags=a,b", "seed=null", "name=123", "--loss=dpo"],
    )
    assert cfg == Cfg(
        name="123", loss="dpo", tags=["a", "b"], seed=None, bf16=True, optim=Optim(lr=3e-4, steps=7)
    )
    assert load_config(Cfg, None, ["tags=[x, y]"]).tags == ["x", "y"]


def test_unknown_key_names_line_and_suggests(tmp_path):
    err = _error(_yaml(tmp_path, "name: demo\nloss: dpo\noptim:\n  lr: 2e-5\n  stepz: 10\n"))
    assert (err.line, err.field) == (5, "optim.stepz")
    assert err.fix == "did you mean 'steps'?"
    assert (
        str(err)
        == f"{tmp_path / 'c.yaml'}:5: field 'optim.stepz': unknown config key. Fix: did you mean 'steps'?"
    )


def test_unknown_key_without_close_match_lists_valid_keys():
    err = _error(None, ["zzz=1"])
    assert err.file == "command line" and err.field == "zzz"
    assert err.fix == "valid keys here: name, loss, tags, seed, bf16, optim"


def test_post_init_error_is_mapped_to_the_nested_field_and_its_line(tmp_path):
    err = _error(_yaml(tmp_path, "name: demo\noptim:\n  steps: 5\n  lr: -1\n"))
    assert (err.line, err.field) == (4, "optim.lr")
    assert "must be > 0 (got -1.0)" in str(err) and err.fix.startswith("use a positive")


def test_override_errors_blame_the_command_line(tmp_path):
    path = _yaml(tmp_path, "name: demo\n")
    for override, field_, text in [
        ("optim.lr=0", "optim.lr", "must be > 0"),
        ("optim.steps=1.5", "optim.steps", "must be an integer (got 1.5)"),
        ("loss=ipo", "loss", "must be one of 'exo', 'dpo' (got 'ipo')"),
        ("optim=3", "optim", "must be a section"),
        ("bf16=maybe", "bf16", "must be true or false"),
    ]:
        err = _error(path, [override])
        assert (err.file, err.line, err.field) == ("command line", None, field_), override
        assert str(err).startswith(f"command line: field '{field_}': {text}"), str(err)


def test_type_errors_in_yaml_name_the_line(tmp_path):
    err = _error(_yaml(tmp_path, "name: x\nseed: abc\n"))
    assert (err.line, err.field) == (2, "seed") and "must be an integer" in str(err)
    err = _error(_yaml(tmp_path, "optim: 5\n", "s.yaml"))
    assert (err.line, err.field) == (1, "optim")


def test_bad_files(tmp_path):
    err = _error(_yaml(tmp_path, "name: x\noptim:\n  lr: [1\n"))
    assert err.message.startswith("invalid YAML") and err.line is not None and err.line >= 3
    err = _error(_yaml(tmp_path, "- a\n- b\n", "list.yaml"))
    assert err.line == 1 and "mapping" in err.message
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"name: \xff\n")
    assert "UTF-8" in _error(latin).message
    err = _error(tmp_path / "missing.yaml")
    assert err.message == "config file not found" and "--config" in err.fix


def test_malformed_override():
    err = _error(None, ["novalue"])
    assert err.field == "novalue" and "key=value" in err.fix


def test_save_config_round_trip(tmp_path):
    cfg = load_config(Cfg, None, ["optim.lr=0.5", "tags=[x, y]", "seed=4"])
    save_config(cfg, tmp_path / "out.yaml")
    assert load_config(Cfg, tmp_path / "out.yaml") == cfg


def test_help_lists_every_key_with_its_docstring():
    assert field_help(Optim) == {"lr": "Learning rate of AdamW.", "steps": "Number of optimiser steps."}
    rows = describe(Cfg)
    assert [k for k, _, _ in rows] == ["name", "loss", "tags", "seed", "bf16", "optim.lr", "optim.steps"]
    assert ("optim.steps", "100", "Number of optimiser steps.") in rows
    text = config_parser("exoalign x", Cfg).format_help()
    for key, default, doc in rows:
        assert key in text and doc in text and f"(default {default})" in text
    args = config_parser("exoalign x", Cfg).parse_args(["--config", "a.yaml", "optim.lr=1", "seed=2"])
    assert args.config == "a.yaml" and args.overrides == ["optim.lr=1", "seed=2"]


def test_override_with_unknown_section_blames_the_command_line(tmp_path):
    """``optm.lr=1`` creates an unknown section ``optm``; the error's field is ``optm`` while the override key
    is ``optm.lr``: the error must still be blamed on the command line, not on the YAML file."""
    err = _error(_yaml(tmp_path, "name: x\n"), ["optm.lr=1"])
    assert err.file == "command line" and err.fix == "did you mean 'optim'?"
