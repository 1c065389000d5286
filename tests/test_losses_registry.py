"""The loss registry: a user's loss with its own hyper-parameter trains through ``exoalign.register_loss`` + the
Trainer and through ``exoalign train loss.name=my_loss.py:fn loss.params={…}``, with no file of the package changed;
``loss.params`` is checked against the function's keyword-only parameters with one-line errors."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

import exoalign
from exoalign.cli import main as cli
from exoalign.config import load_config
from exoalign.errors import ConfigError
from exoalign.losses import LOSSES, exo, loss_info
from exoalign.train.config import TrainConfig

PAIRS = [
    {"prompt": "the movie was", "chosen": " great and wonderful", "rejected": " terrible and boring"},
    {"prompt": "the film was", "chosen": " a delightful story", "rejected": " an awful mess"},
    {"prompt": "what a", "chosen": " fantastic surprise", "rejected": " waste of time"},
    {"prompt": "i loved the", "chosen": " music", "rejected": " dull script"},
]

# A user's loss: EXO with the policy's log-ratio scaled by its own hyper-parameter tau; it records each tau it got.
USER_LOSS = textwrap.dedent('''
    import json, os
    from exoalign.losses import exo

    def tempered_exo(policy_logps, ref_logps, target_logprobs, beta_pi, mask=None, *, tau: float = 1.0):
        with open(os.environ["MY_LOSS_LOG"], "a") as f:
            f.write(json.dumps(tau) + "\\n")
        return exo(policy_logps, ref_logps, target_logprobs, beta_pi * tau, mask)
''')


@pytest.fixture(autouse=True)
def registry():
    """Every test leaves the registry as it found it (other tests count the built-ins)."""
    before = dict(LOSSES)
    yield
    LOSSES.clear()
    LOSSES.update(before)


def test_register_loss_and_trainer_with_its_own_parameter(tmp_path, tiny_model, tiny_tokenizer):
    seen = []

    def margin_exo(policy_logps, ref_logps, target_logprobs, beta_pi, mask=None, *, scale: float = 1.0):
        seen.append(scale)
        return exo(policy_logps, ref_logps, target_logprobs, beta_pi * scale, mask)

    assert exoalign.register_loss("margin_exo", margin_exo) is margin_exo
    info = loss_info("margin_exo")
    assert info.needs_ref and info.listwise and not info.online_only and info.hyper_params == {"scale": 1.0}
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    cfg = {"loss": {"name": "margin_exo", "params": {"scale": 2.5}}, "data": {"max_length": 32},
           "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-3, "ref_cache_dir": str(tmp_path / "cache")}}
    model = exoalign.Trainer(tiny_model, PAIRS, tokenizer=tiny_tokenizer, config=cfg).train()
    assert seen == [2.5, 2.5]
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_user_loss_file_trains_through_the_cli(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """``loss.name=my_loss.py:fn loss.params={tau: 3.0}``: imported, registered, called with tau at every step."""
    (tmp_path / "my_loss.py").write_text(USER_LOSS)
    log = tmp_path / "taus.jsonl"
    monkeypatch.setenv("MY_LOSS_LOG", str(log))
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    monkeypatch.chdir(tmp_path)
    code = cli(["train", f"model.name_or_path={tiny_model_dir}", f"data.train_file={data}", "data.max_length=32",
                "loss.name=my_loss.py:tempered_exo", "loss.params={tau: 3.0}", "train.max_steps=2",
                "train.batch_size=2", "train.lr=1e-3", f"train.output_dir={tmp_path / 'run'}",
                f"train.ref_cache_dir={tmp_path / 'cache'}"])
    assert code == 0, capsys.readouterr().err
    assert [json.loads(line) for line in log.read_text().splitlines()] == [3.0, 3.0]
    assert "summary: 2 optimizer steps" in capsys.readouterr().err
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss.name=simpo", "loss.params={gama: 1.0}"],
         "error: command line: field 'loss.params.gama': loss 'simpo' has no parameter 'gama'. Fix: did you mean 'gamma'?"),
        (["loss.name=simpo", "loss.params={gamma: high}"],
         "error: command line: field 'loss.params.gamma': must be a finite number (got 'high'). Fix: write a number"),
        (["loss.name=cdpo", "loss.params={label_smoothing: 0.7}"],
         "error: command line: field 'loss.params.label_smoothing': label smoothing label_smoothing must be in (0, 0.5)"),
        (["loss.name=exo", "loss.params={tau: 1}"],
         "error: command line: field 'loss.params.tau': loss 'exo' has no parameter 'tau'. Fix: it takes no parameters"),
        (["loss.gamma=1.0"], "error: command line: field 'loss.gamma': unknown config key. Fix: simpo's gamma is a loss "
                             "parameter: write loss.params={gamma: ...}"),
        (["loss.beta=0.2"], "error: command line: field 'loss.beta': unknown config key. Fix: did you mean 'beta_pi'?"),
        (["loss.name=missing.py:fn"], "error: command line: field 'loss.name': loss file 'missing.py' not found."),
        (["loss.name=exoo"], "error: command line: field 'loss.name': unknown loss 'exoo'. Fix: did you mean 'exo'? (use one of exo, dpo"),
    ],
)
def test_bad_loss_settings_are_one_line(tmp_path, capsys, overrides, message):
    assert cli(["train", *overrides, f"train.output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err
    assert not (tmp_path / "run").exists()


def test_user_loss_parameter_without_default_must_be_given(tmp_path):
    def needs_tau(policy_logps, ref_logps, target_logprobs, beta_pi, mask=None, *, tau):
        return exo(policy_logps, ref_logps, target_logprobs, beta_pi * tau, mask)

    exoalign.register_loss("needs_tau", needs_tau)
    with pytest.raises(ConfigError, match=r"field 'loss.params': loss 'needs_tau' needs tau\. Fix: set loss.params=\{tau: \.\.\.\}"):
        load_config(TrainConfig, None, ["loss.name=needs_tau"])
    assert load_config(TrainConfig, None, ["loss.name=needs_tau", "loss.params={tau: 2}"]).loss.params == {"tau": 2}


def test_register_loss_refuses_bad_functions_and_builtin_names():
    with pytest.raises(ConfigError, match="built-in"):
        exoalign.register_loss("exo", lambda *a, **k: None)
    with pytest.raises(ConfigError, match="cannot be called as fn"):
        exoalign.register_loss("two_args", lambda policy_logps, ref_logps: None)


def test_capabilities_come_from_the_registry():
    """Online forms and the reference are decided by the registry's flags, not by lists of names."""
    def pairwise(policy_logps, ref_logps, target_logprobs, beta_pi, mask=None):
        return exo(policy_logps, ref_logps, target_logprobs, beta_pi, mask)

    exoalign.register_loss("pairwise_only", pairwise, listwise=False, needs_ref=False)
    assert not loss_info("pairwise_only").online and loss_info("exo").online and loss_info("rloo").online
    with pytest.raises(ConfigError, match="has no online form"):
        load_config(TrainConfig, None, ["loss.name=pairwise_only", "online.rounds=1", "online.oracle=m:f"])


def test_max_length_alone_adapts_the_default_prompt_length():
    assert load_config(TrainConfig, None, ["data.max_length=96"]).data.max_prompt_length == 48
    assert load_config(TrainConfig, None, []).data.max_prompt_length == 256
    with pytest.raises(ConfigError, match="max_prompt_length"):
        load_config(TrainConfig, None, ["data.max_length=96", "data.max_prompt_length=256"])
    online = load_config(TrainConfig, None, ["data.max_length=64", "online.rounds=1", "online.oracle=m:f",
                                             "online.max_new_tokens=48"])
    assert online.data.max_prompt_length == 16  # room left for the sampled tokens
