"""Two-process DDP on the CPU (gloo, launched with torchrun) takes the same steps as one process with the same
global batch; and the smoke config runs end to end through the CLI."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from exoalign.config import load_config
from exoalign.train.config import TrainConfig
from exoalign.train.engine import read_metrics
from exoalign.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    # One thread per process: two processes on two cores, and 2 threads each would oversubscribe them.
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}



@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun", path=str(BIN)) is None, reason="torchrun not installed")
def test_ddp_two_processes_equal_one(tmp_path):
    common = [f"train.ref_cache_dir={tmp_path / 'cache'}", "train.max_steps=3", "train.log_every=1",
              "train.warmup_steps=0", "data.max_length=40", "data.eval_fraction=0", "train.cpu=true"]
    ddp_dir = tmp_path / "ddp"
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "exoalign.cli", "train",
           "--config", str(SMOKE), f"train.output_dir={ddp_dir}", "train.batch_size=2", *common]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = train(load_config(TrainConfig, SMOKE, [f"train.output_dir={tmp_path / 'one'}", "train.batch_size=4",
                                                 *common]))
    # Global batch 2 processes × 2 = 1 process × 4: the same rows in each step, the same mean loss and update.
    ddp_losses = [r["loss"] for r in read_metrics(ddp_dir)]
    one_losses = [r["loss"] for r in read_metrics(one.parent)]
    assert ddp_losses == pytest.approx(one_losses, abs=1e-5)
    assert len(ddp_losses) == 3 and ddp_losses[0] == pytest.approx(2.7612, abs=1e-3)
    a, b = load_file(str(ddp_dir / "final" / "model.safetensors")), load_file(str(one / "model.safetensors"))
    init = load_file(str(one.parent / "init" / "model.safetensors"))
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-4  # Adam turns float noise in tiny gradients into ~1e-5 moves
        assert (a[k] - init[k]).abs().max() > 1e-3
    assert '"num_processes": 2' in (ddp_dir / "run_info.json").read_text()


@pytest.mark.slow
def test_smoke_config_killed_and_resumed_through_the_cli(tmp_path):
    """``configs/smoke.yaml`` through the CLI, SIGKILLed after its step-20 checkpoint, resumed with --resume: the
    same loss log and weights as an uninterrupted run; the resumed run loads the reference cache."""
    out = tmp_path / "smoke"
    cmd = [sys.executable, "-m", "exoalign.cli", "train", "--config", str(SMOKE), f"train.output_dir={out}",
           f"train.ref_cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (out / "checkpoint-20" / "COMPLETE").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    err = proc.communicate()[1]
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
    assert "reference log-probs (train): computed and cached" in err
    assert not (out / "final").exists() and not (out / "checkpoint-40").exists()  # really cut short

    resumed = subprocess.run([*cmd, "--resume"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "reference log-probs (train): loaded from cache" in resumed.stderr
    assert "(step 20)" in resumed.stderr and f"saved {out / 'final'}" in resumed.stderr

    whole = train(load_config(TrainConfig, SMOKE, [f"train.output_dir={tmp_path / 'whole'}",
                                                   f"train.ref_cache_dir={tmp_path / 'cache'}"]))
    got, want = read_metrics(out), read_metrics(whole.parent)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [5, 10, 15, 20, 25, 30, 35, 40, 40]
    for g, w in zip(got, want):
        for key in ("loss", "rewards/margins", "eval/loss", "eval/rewards/accuracies"):
            assert g.get(key) == pytest.approx(w.get(key), abs=1e-5)
    train_recs = [r for r in got if "loss" in r]
    assert train_recs[-1]["rewards/accuracies"] == 1.0
    assert train_recs[-1]["rewards/margins"] > train_recs[0]["rewards/margins"] + 2
    assert got[-1]["eval/rewards/accuracies"] >= 0.9
    a, b = load_file(str(out / "final" / "model.safetensors")), load_file(str(whole / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert AutoModelForCausalLM.from_pretrained(out / "final").config.n_layer == 2
