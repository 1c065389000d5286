"""benchmarks/throughput.py end to end on a tiny job: every system runs, the JSON has exactly its keys."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"speedup_vs_trl_default", "speedup_vs_trl_fastest", "memory_ratio_vs_trl", "mfu", "bf16_mfu", "cpu", "loss_match",
        "prefix_sharing", "model", "params", "dtype", "versions", "mfu_compiled", "bf16_mfu_compiled"}


@pytest.mark.slow
def test_tiny_run_writes_the_summary(tmp_path: Path) -> None:
    out, md = tmp_path / "throughput.json", tmp_path / "throughput.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--tiny", "--json", str(out), "--md", str(md)],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res) == KEYS
    # Same weights, same pairs in the same order, same math: exoalign and both TRL runs agree on the loss.
    assert res["loss_match"] is True
    for key in ("speedup_vs_trl_default", "speedup_vs_trl_fastest", "memory_ratio_vs_trl", "mfu"):
        assert isinstance(res[key], float) and math.isfinite(res[key]) and res[key] > 0, key
    assert res["mfu"] < 1.0
    # The bf16 row against the bf16 peak measured in the same run (a tiny model is far from it, but above 0).
    assert isinstance(res["bf16_mfu"], float) and 0 < res["bf16_mfu"] < 1.0
    assert res["mfu_compiled"] is None and res["bf16_mfu_compiled"] is None  # their systems did not run
    assert isinstance(res["cpu"], str) and res["cpu"]
    assert set(res["prefix_sharing"]) == {"2", "4"}
    assert all(v > 0 for v in res["prefix_sharing"].values())
    assert {"torch", "transformers", "trl", "exoalign"} <= set(res["versions"])
    assert res["model"] == "gpt2-14m" and res["dtype"] == "fp32" and 10_000 < res["params"] < 1_000_000
    table = md.read_text()
    assert "| exoalign |" in table and "| trl_default |" in table and "| trl_fastest |" in table
    assert "| exoalign_k4 |" in table and "| exoalign_bf16 |" in table  # the second phase's rows ran
    # every system under one allocator, named in the table (exoalign's trainer would otherwise set its own)
    assert ("allocator of every system: glibc keeping freed memory (MALLOC_MMAP_MAX_=0" in table
            or "allocator of every system: the caller's" in table)
    # The step-0 loss is not the trivial value of a policy equal to its reference (the reference has other
    # weights), so agreeing on it checks the log-prob code of both systems.
    lines = table.splitlines()
    header = [c.strip() for c in next(line for line in lines if line.startswith("| system |")).split("|")]
    row = [c.strip() for c in next(line for line in lines if line.startswith("| exoalign |")).split("|")]
    assert abs(float(row[header.index("step-0 loss")]) - 2.7612) > 1e-3


@pytest.mark.slow
def test_compiled_rows(tmp_path: Path) -> None:
    """``exoalign_compiled`` (train.compile) runs the same job: its step-0 loss is the eager one to fp32 rounding,
    and its MFU is reported."""
    out, md = tmp_path / "throughput.json", tmp_path / "throughput.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--tiny", "--systems", "exoalign,exoalign_compiled",
         "--extra", "", "--json", str(out), "--md", str(md)],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert isinstance(res["mfu_compiled"], float) and 0 < res["mfu_compiled"] < 1.0
    assert res["bf16_mfu"] is None and res["bf16_mfu_compiled"] is None
    lines = md.read_text().splitlines()
    header = [c.strip() for c in next(line for line in lines if line.startswith("| system |")).split("|")]
    loss = {name: float(row[header.index("step-0 loss")]) for line in lines if line.startswith("| exoalign")
            for row in [[c.strip() for c in line.split("|")]] for name in [row[1]]}
    # inductor reorders fp32 reductions (the vocabulary's): rounding of a loss of size ~3
    assert loss["exoalign_compiled"] == pytest.approx(loss["exoalign"], abs=1e-4)


def _systems():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import throughput_systems

    return throughput_systems


def test_recorded_matmuls_of_a_linear_layer() -> None:
    """A linear layer's forward and backward are three products (y, dx, dW) of 2·m·k·n FLOPs each; replaying them
    takes positive time and runs the recorded ops on inputs of the recorded shapes."""
    import torch

    ts = _systems()
    lin = torch.nn.Linear(24, 40, bias=False)
    x = torch.randn(16, 24, requires_grad=True)
    with ts.record_matmuls() as rec:
        lin(x).sum().backward()
    assert len(rec.calls) == 3
    assert sorted(ts.matmul_flops(op, args) for op, args in rec.calls) == [2 * 16 * 24 * 40] * 3
    shapes = sorted(tuple(sorted(a[0] for a in args if isinstance(a, tuple))) for _, args in rec.calls)
    assert shapes == sorted([tuple(sorted([(16, 24), (24, 40)])), tuple(sorted([(16, 40), (40, 24)])),
                             tuple(sorted([(40, 16), (16, 24)]))])
    assert ts.replay_matmuls(rec.calls, reps=1) > 0
    # Outside the block nothing is recorded.
    lin(x).sum().backward()
    assert len(rec.calls) == 3


def test_recorded_matmuls_include_onednn_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where ``exoalign.gemm`` sends fp32 products through oneDNN (AMD CPUs with AVX-512), the recorder sees those
    products too: forward and input gradient through oneDNN's linear, the weight gradient through aten, each with
    its 2·m·k·n FLOPs, and the replay runs them."""
    import torch

    from exoalign import gemm

    if not gemm._onednn_available():
        pytest.skip("this torch build has no oneDNN linear")
    monkeypatch.setenv(gemm.ENV, "onednn")
    ts = _systems()
    x = torch.randn(64, 48, requires_grad=True)
    w = torch.randn(1536, 48, requires_grad=True)
    with ts.record_matmuls() as rec:
        gemm.linear(x, w).sum().backward()
    ops = sorted(op for op, _ in rec.calls)
    assert ops == ["mkldnn._linear_pointwise", "mkldnn._linear_pointwise", "mm"]
    assert [ts.matmul_flops(op, args) for op, args in rec.calls] == [2 * 64 * 48 * 1536] * 3
    assert ts.replay_matmuls(rec.calls, reps=1) > 0


@pytest.mark.slow
def test_profile_reports_the_matmul_floor(tmp_path: Path) -> None:
    """``--profile --json`` on the tiny job: the fp32 step's matmul floor is below the step (so the ceiling is
    above the MFU), and its products carry at most the model FLOPs the MFU counts (6·N·tokens, N with the
    embeddings, which multiply nothing)."""
    out = tmp_path / "profile.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--tiny", "--profile",
                           "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    fp32 = res["runs"][0]["floor"]
    assert fp32["precision"] == "fp32" and fp32["matmuls"] > 0 and fp32["tokens"] > 0
    assert 0 < fp32["matmul_s"] < fp32["step_s"]
    assert 0 < fp32["mfu"] < fp32["mfu_ceiling"]
    assert 0 < fp32["matmul_tflop"] <= fp32["model_tflop"]
    assert "Matmul floor" in proc.stdout and "| forward + backward by operator family |" in proc.stdout
