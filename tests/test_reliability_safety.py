"""Issue 8, safety: weights only from safetensors (a directory holding only pickled ``pytorch_model.bin`` is refused
with exit 2 by every command, and nothing is unpickled), ``trust_remote_code`` is exactly what the user set (False by
default), and an oracle is imported only from the ``module:function`` the user wrote, never from data.

YAML is read with ``yaml.safe_load``: the ``!!python`` tag cases are in ``tests/test_reliability.py``.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from exoalign.cli import main as cli

MARKER_MODULE = "from pathlib import Path\nPath({marker!r}).write_text('imported')\ndef f(prompts, completions):\n    return [0.0] * len(completions)\n"
JUDGE = "def f(prompts, completions):\n    return [float(len(c)) for c in completions]\nX = 3\n"


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err.strip()


@pytest.fixture(scope="module")
def pickled_only(tmp_path_factory, tiny_model_dir) -> Path:
    """A model directory with config, tokeniser and weights as a pickle (``pytorch_model.bin``) only. The pickle
    would create a marker file if it were ever unpickled."""
    path = tmp_path_factory.mktemp("pickled")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (path / name).write_bytes((tiny_model_dir / name).read_bytes())

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {path / 'UNPICKLED'}",))

    torch.save({"boom": Boom()}, path / "pytorch_model.bin")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    files = {
        "groups": '{"prompt": "p", "completions": ["x", "y"], "rewards": [1, 2]}\n' * 2,
        "sft": '{"prompt": "p", "completion": "c"}\n' * 2,
        "prompts": '{"prompt": "p"}\n{"prompt": "q"}\n',
    }
    for name, text in files.items():
        (root / f"{name}.jsonl").write_text(text, encoding="utf-8")
    (root / "judge.py").write_text(JUDGE, encoding="utf-8")
    return {name: root / f"{name}.jsonl" for name in files} | {"judge": root / "judge.py"}


def _refusals(m: Path, bad: Path, d: dict[str, Path], o: Path) -> dict[str, tuple[list[str], str]]:
    judge = f"oracle={d['judge']}:f"
    train = [f"data.train_file={d['groups']}", f"train.output_dir={o / 'run'}", "train.cpu=true"]
    return {
        "train": (["train", f"model.name_or_path={bad}", *train], "model.name_or_path"),
        "train-ref": (["train", f"model.name_or_path={m}", f"model.ref_name_or_path={bad}", *train],
                      "model.ref_name_or_path"),
        "sft": (["sft", f"model.name_or_path={bad}", f"data.train_file={d['sft']}", f"train.output_dir={o / 'run'}"],
                "model.name_or_path"),
        "rm": (["rm", "train", f"model.name_or_path={bad}", *train], "model.name_or_path"),
        "sample": (["sample", f"model={bad}", f"prompts={d['prompts']}", f"output={o / 's.jsonl'}"], "model"),
        "score": (["score", f"input={d['groups']}", f"output={o / 's.jsonl'}", f"reward_model={bad}"], "reward_model"),
        "eval-checkpoint": (["eval", f"checkpoints=[{m},{bad}]", f"sft_model={m}", f"prompts={d['prompts']}",
                             f"output={o / 'e.json'}", judge], "checkpoints"),
        "eval-sft": (["eval", f"checkpoints=[{m}]", f"sft_model={bad}", f"prompts={d['prompts']}",
                      f"output={o / 'e.json'}", judge], "sft_model"),
    }


@pytest.mark.parametrize("case", ["train", "train-ref", "sft", "rm", "sample", "score", "eval-checkpoint", "eval-sft"])
def test_pickled_weights_are_refused_by_every_command(tiny_model_dir, pickled_only, data, tmp_path, capsys,
                                                      monkeypatch, case):
    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    argv, field = _refusals(tiny_model_dir, pickled_only, data, tmp_path)[case]
    assert cli(argv) == 2
    line = _one_error(capsys)
    assert line.startswith(f"error: {pickled_only}: field '{field}': no safetensors weights"), line
    assert "pytorch_model.bin" in line and "Fix:" in line
    assert not (pickled_only / "UNPICKLED").exists()
    assert list(tmp_path.iterdir()) == []


@pytest.fixture()
def from_pretrained_calls(monkeypatch) -> list[tuple[str, object]]:
    """Record ``(class, trust_remote_code)`` of every ``from_pretrained`` of the three Auto classes exoalign uses
    (``'absent'`` when the keyword is not passed, which would leave the choice to the library)."""
    calls: list[tuple[str, object]] = []
    for cls in (AutoTokenizer, AutoModelForCausalLM, AutoModelForSequenceClassification):
        real = cls.from_pretrained

        def spy(*args, _real=real, _name=cls.__name__, **kwargs):
            calls.append((_name, kwargs.get("trust_remote_code", "absent")))
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    return calls


@pytest.mark.parametrize("flag", [None, "true", "false"])
def test_trust_remote_code_is_what_the_user_set(tiny_model_dir, tiny_tokenizer, data, tmp_path, from_pretrained_calls,
                                                flag):
    """Every model and tokeniser load of sample, score (reward model), eval and the trainer's loaders passes
    ``trust_remote_code`` explicitly: False unless the user turned it on."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from exoalign.train import setup
    from exoalign.train.config import ModelConfig, TrainConfig
    from exoalign.train.loop import load_reference

    want = flag == "true"
    extra = [] if flag is None else [f"trust_remote_code={flag}"]
    rm = tmp_path / "rm"
    GPT2ForSequenceClassification(GPT2Config(vocab_size=len(tiny_tokenizer), n_layer=1, n_head=2, n_embd=16,
                                             num_labels=1, pad_token_id=tiny_tokenizer.pad_token_id)).save_pretrained(rm)
    tiny_tokenizer.save_pretrained(rm)
    common = ["device=cpu", "max_new_tokens=2", *extra]
    assert cli(["sample", f"model={tiny_model_dir}", f"prompts={data['prompts']}", f"output={tmp_path / 's.jsonl'}",
                *common]) == 0
    assert cli(["score", f"input={data['groups']}", f"output={tmp_path / 'r.jsonl'}", f"reward_model={rm}",
                "device=cpu", *extra]) == 0
    assert cli(["eval", f"checkpoints=[{tiny_model_dir}]", f"sft_model={tiny_model_dir}", f"prompts={data['prompts']}",
                f"oracle={data['judge']}:f", f"output={tmp_path / 'e.json'}", "win_rate=false", "save_samples=false",
                *common]) == 0
    model_cfg = ModelConfig(name_or_path=str(tiny_model_dir)) if flag is None else \
        ModelConfig(name_or_path=str(tiny_model_dir), trust_remote_code=want)
    setup.load_tok(model_cfg, str(tiny_model_dir))
    setup.load_model(model_cfg, str(tiny_model_dir))
    setup.load_model(model_cfg, str(tiny_model_dir), head="reward")
    load_reference(TrainConfig(model=model_cfg), str(tiny_model_dir))
    loaded = {name for name, _ in from_pretrained_calls}
    assert loaded == {"AutoTokenizer", "AutoModelForCausalLM", "AutoModelForSequenceClassification"}
    assert len(from_pretrained_calls) >= 9
    assert all(value is want for _, value in from_pretrained_calls), from_pretrained_calls


def test_trust_remote_code_defaults_to_false_everywhere():
    from exoalign.eval.evaluate import EvalConfig
    from exoalign.stages.sample import SampleConfig
    from exoalign.stages.score import ScoreConfig
    from exoalign.train.config import ModelConfig

    for cls in (ModelConfig, SampleConfig, ScoreConfig, EvalConfig):
        assert cls().trust_remote_code is False, cls


@pytest.fixture()
def oracle_dir(tmp_path, monkeypatch) -> Path:
    """A working directory with a good judge and modules that leave a marker if they are ever imported."""
    monkeypatch.chdir(tmp_path)
    for name in ("judge", "evil_data", "evil_spec"):  # another test may have imported its own `judge`
        sys.modules.pop(name, None)
    importlib.invalidate_caches()
    (tmp_path / "judge.py").write_text(JUDGE, encoding="utf-8")
    for name in ("evil_data", "evil_spec"):
        (tmp_path / f"{name}.py").write_text(MARKER_MODULE.format(marker=str(tmp_path / f"{name}.imported")))
    yield tmp_path
    for name in ("judge", "evil_data", "evil_spec"):
        sys.modules.pop(name, None)


def test_data_never_names_what_is_imported(oracle_dir):
    """Rows may mention modules anywhere (prompt, completions, extra fields): only the user's spec is imported."""
    rows = [{"prompt": "evil_data:f", "completions": ["evil_data.py:f", "evil_data"], "oracle": "evil_data:f",
             "reward_model": "evil_data", "judge": "evil_data.py:f"}] * 3
    src = oracle_dir / "g.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = oracle_dir / "s.jsonl"
    assert cli(["score", f"input={src}", f"output={out}", "--oracle", "judge:f"]) == 0
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["rewards"] for r in scored] == [[14.0, 9.0]] * 3 and scored[0]["oracle"] == "evil_data:f"
    assert not (oracle_dir / "evil_data.imported").exists() and "evil_data" not in sys.modules


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("evil_spec", "cannot read oracle spec 'evil_spec'"),  # no colon: nothing is imported
        ("evil_spec.f", "cannot read oracle spec"),
        ("judge:X", "'judge:X' is not callable"),
        ("judge:missing", "has no attribute 'missing'"),
        ("no_such_module:f", "cannot import oracle module 'no_such_module'"),
        ("judge.py:X", "not callable"),
        ("no_such_file.py:f", "oracle file 'no_such_file.py' not found"),
    ],
)
def test_eval_oracle_spec_must_be_an_explicit_callable(oracle_dir, tiny_model_dir, capsys, spec, needle):
    """``exoalign eval`` takes its judge the same way as ``score`` (``tests/test_score_label.py`` has score's)."""
    prompts = oracle_dir / "p.jsonl"
    prompts.write_text('{"prompt": "p"}\n{"prompt": "q"}\n', encoding="utf-8")
    out = oracle_dir / "e.json"
    assert cli(["eval", f"checkpoints=[{tiny_model_dir}]", f"sft_model={tiny_model_dir}", f"prompts={prompts}",
                f"oracle={spec}", f"output={out}", "device=cpu", "max_new_tokens=2"]) == 2
    line = _one_error(capsys)
    assert "field 'oracle'" in line and needle in line, line
    assert not out.exists() and not (oracle_dir / "e.samples").exists()
    assert not (oracle_dir / "evil_spec.imported").exists() and "evil_spec" not in sys.modules
