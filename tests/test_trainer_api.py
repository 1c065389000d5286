"""``exoalign.Trainer`` from Python: in-memory models, tokenisers and rows (``datasets.Dataset`` and lists), callbacks,
the returned model, row errors naming the index, the reference cache keyed by the weights, and the top-level names."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

import exoalign
from exoalign.errors import ConfigError, InputError
from exoalign.models import file_backed
from exoalign.train.trainer import as_config, weights_fingerprint

PAIRS = [
    {"prompt": "the movie was", "chosen": " great and wonderful", "rejected": " terrible and boring"},
    {"prompt": "the film was", "chosen": " a delightful story", "rejected": " an awful mess"},
    {"prompt": "i loved the", "chosen": " music and the pictures", "rejected": " dull script"},
    {"prompt": "what a", "chosen": " fantastic surprise", "rejected": " waste of time"},
]
GROUPS = [
    {"prompt": "the movie was", "completions": [" great", " boring", " fine"], "rewards": [1.0, -1.0, 0.2]},
    {"prompt": "the film was", "completions": [" wonderful", " awful", " ok"], "rewards": [0.9, -0.8, 0.0]},
    {"prompt": "what a", "completions": [" good time", " bad film", " film"], "rewards": [1.2, -1.1, 0.1]},
]


class Recorder:
    """A callback that records every call."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, dict]] = []
        self.saves: list[str] = []

    def on_step_end(self, state, metrics):
        self.steps.append((state.step, dict(metrics)))

    def on_save(self, state, path):
        self.saves.append(os.fspath(path))


def config(tmp_path, **sections) -> dict:
    """A small run: 3 steps of 2 groups, a high learning rate (so 3 steps move every weight), a private cache."""
    cfg = {"train": {"max_steps": 3, "batch_size": 2, "lr": 1e-3, "log_every": 1,
                     "ref_cache_dir": str(tmp_path / "cache")},
           "data": {"max_length": 32}}
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_dataset_of_pairs_trains_the_model_object(tmp_path, tiny_model, tiny_tokenizer, capsys):
    """A datasets.Dataset of pairs and an in-memory model: the same object comes back trained, the callback sees one
    call per optimizer step with that step's loss, the summary line is printed and no run directory is left."""
    import datasets

    before = snapshot(tiny_model)
    cb = Recorder()
    trainer = exoalign.Trainer(tiny_model, datasets.Dataset.from_list(PAIRS), tokenizer=tiny_tokenizer,
                               config=config(tmp_path, loss={"name": "exo"}), callbacks=[cb])
    out = trainer.train()
    assert out is tiny_model
    assert [s for s, _ in cb.steps] == [1, 2, 3]
    assert all("loss" in m and "grad_norm" in m and "lr" in m for _, m in cb.steps)
    after = snapshot(out)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert "summary: 3 optimizer steps" in capsys.readouterr().err
    assert trainer.final is None and not any(p.name.startswith("exoalign-run-") for p in tmp_path.iterdir())
    assert len(cb.saves) == 1  # the final model, in the temporary directory


def test_list_of_groups_with_rewards_saves_when_output_dir_is_set(tmp_path, tiny_model, tiny_tokenizer):
    """Group rows with rewards (K = 3, rw targets) from a list; with train.output_dir the final model is saved there
    and on_save names it."""
    cb = Recorder()
    run = tmp_path / "run"
    cfg = config(tmp_path, loss={"name": "exo", "target": "rw"}, train={"output_dir": str(run)})
    before = snapshot(tiny_model)
    trainer = exoalign.Trainer(tiny_model, GROUPS, tokenizer=tiny_tokenizer, config=cfg, callbacks=[cb])
    out = trainer.train()
    assert len(cb.steps) == 3 and trainer.final == run / "final"
    assert cb.saves == [str(run / "final")] and (run / "final" / "model.safetensors").is_file()
    assert any(not torch.equal(before[k], v) for k, v in snapshot(out).items())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]


def test_save_final_false_returns_the_model_and_writes_nothing_at_the_end(tmp_path, tiny_model, tiny_tokenizer):
    """train.save_final=false: the trained model comes back and the checkpoints before the last step are written as
    usual (weights kept), but neither the last step's checkpoint nor final; it refuses save_final_state and online
    runs, each with one line."""
    cb = Recorder()
    run = tmp_path / "run"
    cfg = config(tmp_path, loss={"name": "exo", "target": "rw"},
                 train={"output_dir": str(run), "max_steps": 4, "save_every": 2, "keep_checkpoint_weights": True,
                        "save_final": False})
    before = snapshot(tiny_model)
    trainer = exoalign.Trainer(tiny_model, GROUPS, tokenizer=tiny_tokenizer, config=cfg, callbacks=[cb])
    out = trainer.train()
    assert trainer.final is None and not (run / "final").exists() and not (run / "checkpoint-4").exists()
    assert (run / "checkpoint-2" / "model.safetensors").is_file() and not (run / "checkpoint-2" / "state").exists()
    assert cb.saves == [str(run / "checkpoint-2")]
    assert out is tiny_model and any(not torch.equal(before[k], v) for k, v in snapshot(out).items())
    with pytest.raises(ConfigError, match="train.save_final_state"):
        as_config(config(tmp_path, train={"save_final": False, "save_final_state": True}))
    with pytest.raises(ConfigError, match="train.save_final"):
        as_config(config(tmp_path, train={"save_final": False}, online={"rounds": 2, "oracle": "oracle:f"}))


def test_rows_are_validated_like_files_naming_the_index(tiny_model, tiny_tokenizer):
    rows = [PAIRS[0], {"prompt": "x", "chosen": "y"}]
    with pytest.raises(InputError) as e:
        exoalign.Trainer(tiny_model, rows, tokenizer=tiny_tokenizer).train()
    assert str(e.value).startswith("train_data[1]: field 'rejected': missing")
    with pytest.raises(InputError, match=r"^train_data\[0\]: a row must be a dict"):
        exoalign.Trainer(tiny_model, ["not a row"], tokenizer=tiny_tokenizer).train()


def test_in_memory_model_needs_its_tokenizer(tiny_model):
    with pytest.raises(ConfigError, match="field 'tokenizer'"):
        exoalign.Trainer(tiny_model, PAIRS)


def test_reference_cache_is_keyed_by_the_weights(tmp_path, tiny_model, tiny_tokenizer):
    """Two runs from equal weights share the cached reference log-probs; other weights are another key."""
    twin = copy.deepcopy(tiny_model)
    assert weights_fingerprint(tiny_model) == weights_fingerprint(twin)
    hits = []
    for i, model in enumerate((tiny_model, twin)):
        run = tmp_path / f"run{i}"
        cfg = config(tmp_path, train={"output_dir": str(run), "max_steps": 1})
        exoalign.Trainer(model, PAIRS, tokenizer=tiny_tokenizer, config=cfg).train()
        hits.append(json.loads((run / "run_info.json").read_text())["ref_cache"]["train_hit"])
    assert hits == [False, True]
    moved = copy.deepcopy(twin)
    with torch.no_grad():
        next(moved.parameters()).add_(1e-3)
    assert weights_fingerprint(moved) != weights_fingerprint(twin)


def test_explicit_ref_model_and_eval_data(tmp_path, tiny_model, tiny_tokenizer):
    """A reference given as an object is used frozen (online reference mode too); eval_data is evaluated."""
    ref = copy.deepcopy(tiny_model)
    run = tmp_path / "run"
    cfg = config(tmp_path, train={"output_dir": str(run), "ref_mode": "online"})
    exoalign.Trainer(tiny_model, PAIRS, tokenizer=tiny_tokenizer, config=cfg, ref_model=ref,
                     eval_data=PAIRS[:2]).train()
    assert not any(p.requires_grad for p in ref.parameters())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "eval/loss" in records[-1]


def test_config_as_trainconfig_and_model_by_path(tmp_path, tiny_model_dir):
    """A TrainConfig object and a model directory; the data as a path."""
    from exoalign.data import write_rows

    data = write_rows(tmp_path / "pairs.jsonl", PAIRS)
    cfg = exoalign.TrainConfig()
    cfg.train.output_dir, cfg.train.max_steps, cfg.train.batch_size = str(tmp_path / "run"), 2, 2
    cfg.train.ref_cache_dir = str(tmp_path / "cache")
    model = exoalign.Trainer(str(tiny_model_dir), data, config=cfg).train()
    assert isinstance(model, torch.nn.Module) and (tmp_path / "run" / "final").is_dir()
    # the trained weights were given memory of their own before the first step (not the loaded file's mapping)
    assert not any(file_backed(p) for p in model.parameters())
    assert cfg.data.train_file == ""  # the caller's config is not changed


def test_bad_config_dict_is_one_line(tiny_model, tiny_tokenizer):
    with pytest.raises(ConfigError) as e:
        exoalign.Trainer(tiny_model, PAIRS, tokenizer=tiny_tokenizer, config={"train": {"lrr": 1e-3}})
    assert str(e.value) == "config: field 'train.lrr': unknown config key. Fix: did you mean 'lr'?"


# ------------------------------------------------------------------------------------------ import exoalign
def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    return subprocess.run([sys.executable, "-W", "always", "-c", code], env={**base, **env}, capture_output=True,
                          text=True, check=True)


def test_import_sets_the_passive_thread_policy_without_importing_torch():
    out = _python("import os, sys, exoalign; print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    assert out.stdout.split() == ["PASSIVE", "False"] and "ThreadPolicyWarning" not in out.stderr
    out = _python("import os, exoalign; print(os.environ.get('OMP_WAIT_POLICY'))", OMP_WAIT_POLICY="ACTIVE")
    assert out.stdout.split() == ["ACTIVE"]


def test_import_after_torch_warns_once_with_the_fix():
    out = _python("import torch, exoalign, exoalign.losses")
    assert out.stderr.count("ThreadPolicyWarning") == 1 and "OMP_WAIT_POLICY=PASSIVE" in out.stderr
    assert "ThreadPolicyWarning" not in _python("import torch, exoalign", OMP_NUM_THREADS="1").stderr


def test_top_level_names():
    from exoalign.data import load_rows
    from exoalign.losses import get_loss, register_loss
    from exoalign.train.config import TrainConfig
    from exoalign.train.trainer import Trainer

    assert (exoalign.Trainer, exoalign.TrainConfig, exoalign.load_rows, exoalign.get_loss, exoalign.register_loss) == (
        Trainer, TrainConfig, load_rows, get_loss, register_loss)


class RoundRecorder(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.rounds: list[tuple[int, float]] = []

    def on_round_end(self, state, metrics):
        self.rounds.append((state.step, metrics["online/round"]))


def test_online_rounds_run_through_the_same_class(tmp_path, tiny_model, tiny_tokenizer):
    """online.rounds >= 1: an in-memory model and prompt rows go through the online rounds; on_round_end once per
    round, on_step_end once per step; the trained model comes back as an object."""
    (tmp_path / "oracle.py").write_text("def f(prompts, completions):\n    return [c.count('e') for c in completions]\n")
    cb = RoundRecorder()
    cfg = config(tmp_path, loss={"beta_pi": 1.0},
                 online={"rounds": 2, "k": 2, "prompts_per_round": 2, "steps_per_round": 1, "max_new_tokens": 4,
                         "oracle": f"{tmp_path / 'oracle.py'}:f"})
    prompts = [{"prompt": p["prompt"]} for p in PAIRS]
    model = exoalign.Trainer(tiny_model, prompts, tokenizer=tiny_tokenizer, config=cfg, callbacks=[cb]).train()
    assert isinstance(model, torch.nn.Module)
    assert [s for s, _ in cb.steps] == [1, 2] and cb.rounds == [(1, 0), (2, 1)]


def test_lora_on_an_in_memory_model_comes_back_merged(tmp_path, tiny_model, tiny_tokenizer):
    """model.lora_r adds adapters to the object given; the reference is the adapter-less base; the model that comes
    back is the base with the trained adapters merged (what final holds)."""
    pytest.importorskip("peft")
    before = snapshot(tiny_model)
    cfg = config(tmp_path, model={"lora_r": 4}, train={"lr": 1e-2})
    out = exoalign.Trainer(tiny_model, PAIRS, tokenizer=tiny_tokenizer, config=cfg).train()
    assert out is tiny_model and not hasattr(out, "peft_config")
    after = snapshot(out)
    assert set(after) == set(before)  # no lora_A / lora_B left: merged
    assert any(not torch.equal(before[k], after[k]) for k in before)
