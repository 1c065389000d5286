"""Disk use of checkpoints: only the newest ``train.save_total_limit`` checkpoints hold optimizer state while a run
goes; a finished run keeps ``final`` alone unless asked for more (``keep_checkpoint_weights``, ``save_final_state``);
online rounds follow ``save_every`` like offline steps, and a resume from a checkpoint anywhere in a round is exact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from exoalign.config import load_config
from exoalign.errors import ConfigError
from exoalign.online import rounds as online
from exoalign.online import train_online
from exoalign.train import engine
from exoalign.train.checkpoint import COMPLETE, STATE_FILE, finish, list_checkpoints, prune
from exoalign.train.config import TrainConfig
from exoalign.train.engine import read_metrics
from exoalign.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
ORACLE = '''
def f(prompts, completions):
    return [10.0 * c.count("e") / (1 + len(c)) for c in completions]
'''


def make_cfg(tmp_path: Path, *overrides: str, name: str = "run") -> TrainConfig:
    """The smoke config's tiny model, 6 steps (as tests/test_train_loop.py)."""
    base = [f"train.output_dir={tmp_path / name}", f"train.ref_cache_dir={tmp_path / 'cache'}", "train.max_steps=6",
            "train.log_every=1", "train.save_every=0", "data.max_length=40", "train.warmup_steps=0"]
    return load_config(TrainConfig, SMOKE, base + list(overrides))


def make_online_cfg(tmp_path: Path, *overrides: str, name: str = "run") -> TrainConfig:
    """The smoke config's tiny model online (as tests/test_train_online.py): rounds of 8 prompts × K=4, 2 steps."""
    oracle = tmp_path / "oracle.py"
    oracle.write_text(ORACLE, encoding="utf-8")
    base = [f"train.output_dir={tmp_path / name}", f"train.ref_cache_dir={tmp_path / 'cache'}", "train.log_every=1",
            "train.save_every=0", "train.warmup_steps=0", "train.lr=3e-4", "train.scheduler=linear",
            "data.eval_fraction=0", "loss.beta_pi=1.0", "online.rounds=2", "online.k=4",
            "online.prompts_per_round=8", "online.steps_per_round=2", "online.max_new_tokens=12",
            f"online.oracle={oracle}:f"]
    return load_config(TrainConfig, SMOKE, base + list(overrides))


def states(out: Path) -> list[str]:
    """Checkpoints holding optimizer state (resumable), oldest first."""
    return [p.name for _, p in list_checkpoints(out, warn=False, only_resumable=True)]


def names(out: Path) -> list[str]:
    return [p.name for _, p in list_checkpoints(out, warn=False)]


def watch_saves(monkeypatch) -> list[list[str]]:
    """After every checkpoint save (and its pruning), the resumable checkpoints on disk."""
    seen: list[list[str]] = []
    real = engine.save_checkpoint

    def spy(accelerator, model, tokenizer, output_dir, *a, **kw):
        path = real(accelerator, model, tokenizer, output_dir, *a, **kw)
        seen.append(states(Path(output_dir)))
        return path

    monkeypatch.setattr(engine, "save_checkpoint", spy)
    return seen


def fake_checkpoint(out: Path, step: int, *, state: bool = True) -> Path:
    path = out / f"checkpoint-{step}"
    (path / "state").mkdir(parents=True) if state else path.mkdir(parents=True)
    if state:
        (path / "state" / "optimizer.bin").write_bytes(b"x")
    (path / "model.safetensors").write_bytes(b"w")
    (path / STATE_FILE).write_text(f'{{"step": {step}}}')
    (path / COMPLETE).write_text("{}")
    return path


@pytest.mark.parametrize("keep_weights", [False, True])
def test_prune_keeps_the_state_of_the_newest_and_finish_drops_the_rest(tmp_path, keep_weights):
    """prune: states beyond the newest ``total_limit`` go (the checkpoint whole, or its state alone with
    keep_weights); half-deleted leftovers of a kill go too. finish: no state is left; weights stay only if asked."""
    for step in (2, 4, 6):
        fake_checkpoint(tmp_path, step)
    (tmp_path / ".deleting-checkpoint-0").mkdir()  # a delete killed half-way
    (tmp_path / "checkpoint-4" / ".state-deleting").mkdir()
    prune(tmp_path, 2, keep_weights=keep_weights)
    assert states(tmp_path) == ["checkpoint-4", "checkpoint-6"]
    assert names(tmp_path) == (["checkpoint-2", "checkpoint-4", "checkpoint-6"] if keep_weights
                               else ["checkpoint-4", "checkpoint-6"])
    assert not (tmp_path / ".deleting-checkpoint-0").exists()
    assert not (tmp_path / "checkpoint-4" / ".state-deleting").exists()
    prune(tmp_path, None, keep_weights=keep_weights)  # null keeps every state
    assert states(tmp_path) == ["checkpoint-4", "checkpoint-6"]
    finish(tmp_path, keep_state=True, keep_weights=keep_weights)
    assert states(tmp_path) == ["checkpoint-4", "checkpoint-6"]
    finish(tmp_path, keep_state=False, keep_weights=keep_weights)
    assert states(tmp_path) == []
    assert names(tmp_path) == (["checkpoint-2", "checkpoint-4", "checkpoint-6"] if keep_weights else [])
    if keep_weights:
        assert (tmp_path / "checkpoint-6" / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == names(tmp_path)  # no temp dirs left


@pytest.mark.parametrize(
    ("overrides", "during", "after_all", "after_states"),
    [
        # Defaults (save_total_limit=1): one state while training, only final after.
        (["train.save_every=2"], [["checkpoint-2"], ["checkpoint-4"]], [], []),
        (["train.save_every=0"], [], [], []),
        # Two resumable checkpoints while training; weights of every checkpoint (the last step's too) after.
        (["train.save_every=2", "train.save_total_limit=2", "train.keep_checkpoint_weights=true"],
         [["checkpoint-2"], ["checkpoint-2", "checkpoint-4"], ["checkpoint-2", "checkpoint-4"]],
         ["checkpoint-2", "checkpoint-4", "checkpoint-6"], []),
        # save_every not dividing max_steps: the last step still gets its weights.
        (["train.save_every=4", "train.keep_checkpoint_weights=true"], [["checkpoint-4"], ["checkpoint-4"]],
         ["checkpoint-4", "checkpoint-6"], []),
        # Keep the last step's optimizer state so the run can be continued; null limit keeps all while training.
        (["train.save_every=2", "train.save_total_limit=null", "train.save_final_state=true"],
         [["checkpoint-2"], ["checkpoint-2", "checkpoint-4"], ["checkpoint-2", "checkpoint-4", "checkpoint-6"]],
         ["checkpoint-2", "checkpoint-4", "checkpoint-6"], ["checkpoint-2", "checkpoint-4", "checkpoint-6"]),
        (["train.save_every=0", "train.save_final_state=true"], [["checkpoint-6"]], ["checkpoint-6"], ["checkpoint-6"]),
        # Weights only: no save writes optimizer state, every checkpoint's weights stay.
        (["train.save_every=2", "train.keep_checkpoint_weights=true", "train.save_only_model=true"], [[], [], []],
         ["checkpoint-2", "checkpoint-4", "checkpoint-6"], []),
    ],
    ids=["default", "save_every_0", "limit2_weights", "uneven_weights", "final_state_all", "final_state_only",
         "only_model"],
)
def test_offline_checkpoints_on_disk(tmp_path, monkeypatch, overrides, during, after_all, after_states):
    """A 6-step run: the resumable checkpoints after each save, and what stays after the run."""
    seen = watch_saves(monkeypatch)
    final = train(make_cfg(tmp_path, *overrides))
    out = final.parent
    assert seen == during
    assert names(out) == after_all and states(out) == after_states
    assert (final / COMPLETE).is_file() and (final / "model.safetensors").is_file()
    assert not (final / "state").exists()
    assert not list(out.glob(".*checkpoint-*")) and not list(out.glob("checkpoint-*/.state-deleting"))


def test_weights_only_checkpoints_change_nothing_of_the_training(tmp_path):
    """train.save_only_model: the checkpoints hold the very weights of a run saving its state too (same losses,
    same final weights), with no state directory; asking for the last step's state as well is refused."""
    keep = ("train.save_every=2", "train.keep_checkpoint_weights=true")
    light = train(make_cfg(tmp_path, *keep, "train.save_only_model=true", name="light")).parent
    full = train(make_cfg(tmp_path, *keep, name="full")).parent
    assert [r.get("loss") for r in read_metrics(light)] == [r.get("loss") for r in read_metrics(full)]
    for step in (2, 4, 6):
        a = load_file(str(light / f"checkpoint-{step}" / "model.safetensors"))
        b = load_file(str(full / f"checkpoint-{step}" / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert not (light / f"checkpoint-{step}" / "state").exists()
    with pytest.raises(ConfigError, match="save_only_model"):
        make_cfg(tmp_path, "train.save_only_model=true", "train.save_final_state=true", name="both")


def test_a_finished_run_continues_only_with_its_state(tmp_path):
    """By default a finished run keeps no optimizer state: --resume to more steps is refused, naming the flag;
    with save_final_state it continues from the last step's checkpoint, as the uninterrupted longer run."""
    # A constant rate whatever the planned length; no held-out evaluation record at the end of the short run.
    # Batches of 32 of the 96 rows: 3 steps read a whole epoch, so the 3- and 6-step runs score every row and
    # share one reference table. (A plan of part of an epoch scores only its rows, and a row's reference log-prob
    # can differ in its last bits with the rows batched beside it: on some kernel paths, e.g.
    # ATEN_CPU_CAPABILITY=default, the longer run's table would then differ from the shorter one's.)
    const = ("train.save_every=2", "train.scheduler=constant", "data.eval_fraction=0", "train.batch_size=32")
    train(make_cfg(tmp_path, "train.max_steps=3", *const, name="a"))
    with pytest.raises(ConfigError, match="save_final_state"):
        train(make_cfg(tmp_path, "train.max_steps=6", *const, "train.resume=true", name="a"))
    train(make_cfg(tmp_path, "train.max_steps=3", *const, "train.save_final_state=true", name="b"))
    assert states(tmp_path / "b") == ["checkpoint-3"]
    more = train(make_cfg(tmp_path, "train.max_steps=6", *const, "train.resume=true", name="b"))
    whole = train(make_cfg(tmp_path, "train.max_steps=6", *const, name="c"))
    assert [r.get("loss") for r in read_metrics(more.parent)] == [r.get("loss") for r in read_metrics(whole.parent)]
    a, b = load_file(str(more / "model.safetensors")), load_file(str(whole / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert states(tmp_path / "b") == []  # the continued run ended without save_final_state


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "during", "after_all"),
    [
        # 4 rounds of 2 steps, save_every=3 (not a round's length): checkpoints at steps 3 and 6 only.
        (["train.save_every=3"], [["checkpoint-3"], ["checkpoint-6"]], []),
        (["train.save_every=0"], [], []),
        (["train.save_every=2", "train.keep_checkpoint_weights=true"],
         [["checkpoint-2"], ["checkpoint-4"], ["checkpoint-6"], ["checkpoint-6"]],
         ["checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-8"]),
    ],
    ids=["every3", "none", "weights"],
)
def test_online_rounds_follow_save_every(tmp_path, monkeypatch, overrides, during, after_all):
    """Online runs hold at most save_total_limit (1) optimizer states after any save, and none after the run;
    every round still writes its sample file."""
    seen = watch_saves(monkeypatch)
    final = train_online(make_online_cfg(tmp_path, "online.rounds=4", *overrides))
    out = final.parent
    assert seen == during
    assert names(out) == after_all and states(out) == []
    assert sorted(p.name for p in (out / "online").iterdir()) == [f"round-{r:05d}.json" for r in range(4)]


class _Killed(BaseException):
    """Stands for SIGKILL: a BaseException, so no ``except Exception`` on the way cleans anything up."""


@pytest.mark.slow
def test_online_resume_from_a_checkpoint_inside_a_round_is_exact(tmp_path, monkeypatch):
    """Rounds of 2 steps, a checkpoint every 3 steps (the one kept at the kill is step 3, inside round 1),
    killed during step 6 (round 2, whose samples are on disk): the resumed run re-trains from step 3, samples
    round 2 again from the same policy, and ends with the loss log, sample files and weights of an
    uninterrupted run, bit for bit."""
    args = ("online.rounds=4", "train.save_every=3")
    whole = train_online(make_online_cfg(tmp_path, *args, name="whole"))
    real, calls = online.compute_loss, [0]

    def dies(*a, **kw):
        if torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] == 6:
                raise _Killed
        return real(*a, **kw)

    monkeypatch.setattr(online, "compute_loss", dies)
    with pytest.raises(_Killed):
        train_online(make_online_cfg(tmp_path, *args, name="cut"))
    cut = tmp_path / "cut"
    assert states(cut) == ["checkpoint-3"] and (cut / "online" / "round-00002.json").is_file()
    monkeypatch.setattr(online, "compute_loss", real)
    resumed = train_online(make_online_cfg(tmp_path, *args, "train.resume=true", name="cut"))

    def log(run: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in read_metrics(run)]

    assert log(resumed.parent) == log(whole.parent)
    for r in range(4):
        name = f"online/round-{r:05d}.json"
        assert (resumed.parent / name).read_bytes() == (whole.parent / name).read_bytes()
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert names(cut) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_finite_reads_each_weight_once_and_misses_nothing(dtype):
    """The pre-save check: any NaN, +inf or -inf in any parameter is found; large finite weights whose norm
    overflows are not mistaken for non-finite ones."""
    from exoalign.train.checkpoint import all_finite

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3)).to(dtype)

    assert all_finite(model())
    big = model()
    with torch.no_grad():
        big[0].weight.fill_(torch.finfo(dtype).max / 2)  # finite, yet its norm overflows to inf
    assert not torch.isfinite(torch.linalg.vector_norm(big[0].weight))
    assert all_finite(big)
    for bad in (float("nan"), float("inf"), float("-inf")):
        for layer, name in ((0, "weight"), (1, "bias"), (2, "weight")):
            m = model()
            with torch.no_grad():
                getattr(m[layer], name).view(-1)[3] = bad
            assert not all_finite(m), (bad, layer, name)
