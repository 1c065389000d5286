"""Issue 12 items 10, 11, 15: weight-decay groups, AdamW betas / eps, and "did you mean" for top-level keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from exoalign.cli import main as cli
from exoalign.config import load_config
from exoalign.errors import ConfigError
from exoalign.models import build_model, tiny_config
from exoalign.train.config import TrainArgs, TrainConfig
from exoalign.train.setup import make_optimizer, no_decay_names, param_groups

REPO = Path(__file__).resolve().parents[1]


def _llama():
    config = tiny_config(64, model_type="llama", hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=32, attention_bias=True, pad_token_id=0)
    return build_model(config, seed=0)


# ------------------------------------------------------------------------------------------ item 10
def test_gpt2_decay_groups_hold_matrices_and_embeddings_only():
    model = build_model(tiny_config(64, n_layer=1), seed=0)
    skip = no_decay_names(model)
    names = dict(model.named_parameters())
    # GPT-2: every LayerNorm weight and bias, and the Conv1D biases, are exempt; the matrices and embeddings not.
    assert skip == {n for n in names if n.endswith(".bias") or ".ln_" in n or n.startswith("transformer.ln_f")}
    assert {"transformer.h.0.attn.c_attn.weight", "transformer.wte.weight", "transformer.wpe.weight"}.isdisjoint(skip)
    assert "transformer.h.0.ln_1.weight" in skip and "transformer.ln_f.weight" in skip
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)  # tied lm_head counted once
    assert {id(p) for p in no_decay["params"]} == {id(names[n]) for n in skip}


def test_rmsnorm_weights_are_exempt_by_module_not_by_name():
    model = _llama()
    skip = no_decay_names(model)
    norms = {n for n, _ in model.named_parameters() if "norm" in n}
    biases = {n for n, _ in model.named_parameters() if n.endswith("bias")}
    assert norms and biases and skip == norms | biases  # LlamaRMSNorm weights and the q/k/v/o biases
    assert "model.layers.0.mlp.up_proj.weight" not in skip


def test_exclusion_can_be_turned_off_and_no_decay_means_one_group():
    model = _llama()
    (everything,) = param_groups(model, 0.1, exclude_norm_bias=False)
    assert len(everything["params"]) == len(list(model.parameters())) and everything["weight_decay"] == 0.1
    assert len(param_groups(model, 0.0)) == 1


def test_a_step_leaves_norm_weights_undecayed():
    """With zero gradients AdamW's only change is the decay: matrices shrink by lr·wd, norm weights stay."""
    model = build_model(tiny_config(64, n_layer=1), seed=0)
    with torch.no_grad():
        model.transformer.ln_f.weight.fill_(2.0)
    opt = make_optimizer(model, TrainArgs(lr=0.5, weight_decay=0.1))
    w = model.transformer.h[0].mlp.c_fc.weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(model.transformer.h[0].mlp.c_fc.weight, w * (1 - 0.5 * 0.1))
    assert torch.all(model.transformer.ln_f.weight == 2.0)


# ------------------------------------------------------------------------------------------ item 11
def test_betas_and_eps_reach_the_optimizer():
    model = _llama()
    opt = make_optimizer(model, TrainArgs(lr=1e-4, adam_beta1=0.8, adam_beta2=0.95, adam_eps=1e-6, weight_decay=0.01))
    for group in opt.param_groups:
        assert group["betas"] == (0.8, 0.95) and group["eps"] == 1e-6 and group["lr"] == 1e-4
    defaults = make_optimizer(model, TrainArgs()).param_groups[0]
    assert defaults["betas"] == (0.9, 0.999) and defaults["eps"] == 1e-8


def test_the_training_loop_builds_its_optimizer_from_the_config(tmp_path, tiny_model_dir):
    """Through `exoalign train`: the saved optimizer state of a checkpoint carries the configured betas."""
    pairs = REPO / "configs" / "data" / "toy_pairs.jsonl"
    out = tmp_path / "run"
    assert cli(["train", f"model.name_or_path={tiny_model_dir}", f"data.train_file={pairs}", "train.cpu=true",
                "train.max_steps=1", "train.save_every=1", "train.save_final_state=true", "train.adam_beta1=0.85", "train.adam_beta2=0.95",
                "train.adam_eps=1e-7", "train.weight_decay=0.1", f"train.output_dir={out}",
                f"train.ref_cache_dir={tmp_path / 'cache'}"]) == 0
    state = torch.load(next((out / "checkpoint-1").rglob("optimizer*.bin")), weights_only=True)
    groups = state["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert all(tuple(g["betas"]) == (0.85, 0.95) and g["eps"] == 1e-7 for g in groups)


@pytest.mark.parametrize(("override", "needle"), [
    ("train.adam_beta1=1.0", "field 'train.adam_beta1': must be in [0, 1)"),
    ("train.adam_beta2=-0.1", "field 'train.adam_beta2': must be in [0, 1)"),
    ("train.adam_eps=0", "field 'train.adam_eps': must be > 0"),
    ("train.weight_decay=.nan", "field 'train.weight_decay'"),
])
def test_bad_optimizer_values_are_refused(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace(")", r"\)")):
        load_config(TrainConfig, None, [override])


def test_paper_configs_use_the_authors_adam_betas():
    paths = [p for s in ("imdb", "tldr", "hh") for p in sorted((REPO / "configs" / s).glob("*.yaml"))]
    trained = [p for p in paths if "train" in (yaml.safe_load(p.read_text()) or {})]
    assert len(trained) == 17
    for path in trained:
        train = yaml.safe_load(path.read_text())["train"]
        assert (train["adam_beta1"], train["adam_beta2"], train["adam_eps"]) == (0.9, 0.95, 1e-8), path


# ------------------------------------------------------------------------------------------ item 15
@pytest.mark.parametrize(("argv", "field", "suggestion"), [
    (["lr=1e-5"], "lr", "train.lr"),
    (["--learning_rate", "1e-5"], "learning_rate", "train.lr"),
    (["--learning-rate=1e-5"], "learning_rate", "train.lr"),
    (["seed=1"], "seed", "train.seed"),
    (["max_length=64"], "max_length", "data.max_length"),
    (["beta=0.1"], "beta", "loss.beta_pi"),
    (["gradient_accumulation_steps=4"], "gradient_accumulation_steps", "train.grad_accum"),
    (["model.lr=1"], "model.lr", "train.lr"),
])
def test_unknown_top_level_keys_suggest_the_dotted_key(capsys, argv, field, suggestion):
    assert cli(["train", *argv]) == 2
    line = capsys.readouterr().err.strip()
    assert line == f"error: command line: field '{field}': unknown config key. Fix: did you mean '{suggestion}'?"


def test_yaml_top_level_key_gets_the_dotted_suggestion_with_its_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {init: scratch}\nlr: 1.0e-5\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, path)
    assert (err.value.line, err.value.field, err.value.fix) == (2, "lr", "did you mean 'train.lr'?")
