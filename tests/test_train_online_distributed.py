"""Online EXO across processes: ``torchrun`` with 2 CPU processes (gloo) runs ``exoalign train online.rounds=2``
on the smoke model with an oracle and held-out prompts; its round metrics, held-out points and final weights equal a
1-process run at the same global batch (2 × 2 groups per step against 1 × 4)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from exoalign.config import load_config
from exoalign.eval.heldout import read_points
from exoalign.train.config import TrainConfig
from exoalign.train.engine import read_metrics
from exoalign.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
BIN = Path(sys.executable).parent
ORACLE = '''
def f(prompts, completions):
    return [10.0 * c.count("e") / (1 + len(c)) for c in completions]
'''


@pytest.mark.skipif(shutil.which("torchrun", path=str(BIN)) is None, reason="torchrun not installed")
def test_two_processes_equal_one_at_the_same_global_batch(tmp_path):
    """Shards of 4 prompts per process are exactly one generation batch (online.generation_batch_size=4) and one
    log-μ batch (train.ref_batch_size=4), the batches one process forms too, so both runs draw the same tokens
    (per-completion seeds) and get the same rewards: ``online/reward``, ``online/length`` and the sampled ids are
    equal exactly. What differs is fp32 rounding: π_sft's rows are split by stride across processes (other
    batches), and DDP averages two 2-group gradients instead of one 4-group mean. Log-probs are sums of ≤ 12
    token terms of magnitude ≤ log(300) ≈ 5.7, so |sum| ≤ 70 where one fp32 ulp is 7.6e-6: a few ulps is ≤ 5e-5
    on log-prob metrics. The losses, ESS and the KL are smooth functions of those log-prob differences with slopes
    ≤ β_π = 1 (softmax over the group), so they inherit the same absolute bound, 5e-5 (not the ulp of an O(1) loss:
    under ATEN_CPU_CAPABILITY=default a loss differed by 1.8e-6). With adam_eps = 1e-3 an update
    moves by at most lr/adam_eps = 1 × a gradient difference, which is a few ulps of gradients clipped to norm 1,
    so over 4 steps the weights agree to 4 × (a few × 1.2e-7) ≤ 1e-5 (a round's samples then come from weights
    that equal to that, and a Gumbel draw flips only on a score gap that small)."""
    oracle = tmp_path / "oracle.py"
    oracle.write_text(ORACLE, encoding="utf-8")
    common = [f"train.ref_cache_dir={tmp_path / 'cache'}", "train.log_every=1", "train.warmup_steps=0",
              "train.lr=1e-3", "train.adam_eps=1e-3", "data.eval_fraction=0", "loss.beta_pi=1.0", "online.rounds=2",
              "online.k=4", "online.prompts_per_round=8", "online.steps_per_round=2", "online.max_new_tokens=12",
              "online.generation_batch_size=4", "train.ref_batch_size=4", f"online.oracle={oracle}:f",
              "data.eval_file=configs/data/toy_sft.jsonl", "online.eval_every=1", "train.cpu=true"]
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "exoalign.cli", "train",
           "--config", str(SMOKE), f"train.output_dir={two}", "train.batch_size=2", *common]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("summary: 2 rounds") == 1  # written once, by the main process
    one = train(load_config(TrainConfig, SMOKE, [f"train.output_dir={tmp_path / 'one'}", "train.batch_size=4",
                                                 *common])).parent

    def rounds(run: Path) -> list[dict]:
        return [r for r in read_metrics(run) if "online/round" in r]

    got, want = rounds(two), rounds(one)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [2, 4]
    for g, w in zip(got, want):
        for key in ("online/reward", "online/reward_std", "online/length", "online/finished"):
            assert g[key] == w[key], key
        for key in ("online/kl", "heldout/kl", "heldout/kl_k3"):
            assert g[key] == pytest.approx(w[key], abs=5e-5), key
        for key in ("online/ess", "online/ess_policy", "online/loss"):
            assert g[key] == pytest.approx(w[key], abs=5e-5), key
    losses = [(r["loss"], r2["loss"]) for r, r2 in zip(read_metrics(two), read_metrics(one)) if "loss" in r]
    assert len(losses) == 4 and all(a == pytest.approx(b, abs=5e-5) for a, b in losses)
    for r in (0, 1):  # the round files are written once, and hold the same samples
        a = json.loads((two / "online" / f"round-{r:05d}.json").read_text())
        b = json.loads((one / "online" / f"round-{r:05d}.json").read_text())
        assert a["completion_ids"] == b["completion_ids"] and a["rewards"] == b["rewards"]
    assert [p["results"][0]["step"] for p in read_points(two)] == [0, 2, 4]
    wa, wb = load_file(str(two / "final" / "model.safetensors")), load_file(str(one / "final" / "model.safetensors"))
    init = load_file(str(one / "init" / "model.safetensors"))
    for k in wa:
        assert (wa[k] - wb[k]).abs().max() <= 1e-5, k
    assert max(float((wb[k] - init[k]).abs().max()) for k in wb) > 1e-3  # the runs trained
    assert '"num_processes": 2' in (two / "run_info.json").read_text()
