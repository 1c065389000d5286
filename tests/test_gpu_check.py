"""benchmarks/gpu_check.sh on a machine without a GPU: one skip line per CUDA part, JSON says skipped."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PARTS = {"cuda_tests", "fast_sampler", "throughput", "compiled", "sampling", "demo", "full_demo", "online_vllm"}


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: run the script itself")
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_skips_every_part_without_a_gpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    skips = [line for line in proc.stdout.splitlines() if line.startswith("skip: ")]
    assert len(skips) == len(PARTS) and all("no CUDA GPU" in line for line in skips)
    res = json.loads(out.read_text())
    assert res["gpu"] is None and res["all_passed"] is False
    assert set(res["parts"]) == PARTS
    assert all(v["status"] == "skipped" for v in res["parts"].values())
