"""exoalign.hardware: bf16 only where it is fast, and glibc's allocator kept for training."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from exoalign import hardware
from exoalign.demo.settings import DemoSettings


def test_fast_bf16_follows_onednn():
    """On CPU: oneDNN's own answer (AVX-512 / AMX yes, AVX2-only no)."""
    assert hardware.fast_bf16("cpu") == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert hardware.fast_bf16(torch.device("cpu")) == hardware.fast_bf16("cpu")


@pytest.mark.parametrize("fast", [True, False])
def test_demo_auto_precision_follows_the_device(monkeypatch, fast):
    monkeypatch.setattr(hardware, "fast_bf16", lambda device="cpu": fast)
    s = DemoSettings()
    assert (s.mixed_precision, s.sample_dtype) == ("auto", "auto")
    r = s.for_device("cpu")
    assert (r.mixed_precision, r.sample_dtype) == (("bf16", "bfloat16") if fast else ("fp32", "model"))
    # an explicit choice is kept either way
    e = DemoSettings(mixed_precision="bf16", sample_dtype="model").for_device("cpu")
    assert (e.mixed_precision, e.sample_dtype) == ("bf16", "model")


def test_slow_bf16_warns_once_per_setting(monkeypatch, caplog):
    monkeypatch.setattr(hardware, "fast_bf16", lambda device="cpu": False)
    monkeypatch.setattr(hardware, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="exoalign.hardware"):
        assert hardware.warn_slow_bf16("cpu", "train.mixed_precision=bf16", "train.mixed_precision=no")
        assert not hardware.warn_slow_bf16("cpu", "train.mixed_precision=bf16", "train.mixed_precision=no")
    assert len(caplog.records) == 1 and "Fix: train.mixed_precision=no" in caplog.records[0].getMessage()
    monkeypatch.setattr(hardware, "fast_bf16", lambda device="cpu": True)
    assert not hardware.warn_slow_bf16("cpu", "sample_dtype=bfloat16", "sample_dtype=model")


@pytest.fixture
def mallopt_calls(monkeypatch):
    """``mallopt`` calls recorded instead of made, in a process that has applied nothing yet."""
    calls = []

    class Fake:
        def mallopt(self, p, v):
            calls.append((p, v))
            return 1

    monkeypatch.setattr(hardware, "_glibc", lambda: Fake())
    monkeypatch.setattr(hardware, "_malloc_state", None)
    return calls


@pytest.mark.parametrize("env", [{"MALLOC_TRIM_THRESHOLD_": "0"}, {"GLIBC_TUNABLES": "glibc.malloc.mxfast=0"},
                                 {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}])
def test_the_users_allocator_choice_wins(monkeypatch, mallopt_calls, env):
    calls = mallopt_calls
    assert hardware.keep_freed_memory(env) is False and calls == []
    monkeypatch.setattr(hardware, "_malloc_state", None)
    assert hardware.keep_freed_memory({}) is True and calls == list(hardware.MALLOC_SETTINGS)


def test_gpu_work_leaves_glibc_alone(mallopt_calls):
    """Work on another device than the CPU does not touch the allocator; CPU work (also ``cpu:0``) does."""
    calls = mallopt_calls
    assert hardware.keep_freed_memory({}, device="cuda:0") is False and calls == []
    assert hardware.keep_freed_memory({}, device=torch.device("cuda")) is False and calls == []
    assert hardware.keep_freed_memory({}, device=torch.device("cpu", 0)) is True
    assert calls == list(hardware.MALLOC_SETTINGS)


@pytest.mark.parametrize("fast", [True, False])
def test_auto_sample_dtype_follows_the_device(monkeypatch, fast):
    monkeypatch.setattr(hardware, "fast_bf16", lambda device="cpu": fast)
    assert hardware.resolve_sample_dtype("auto", "cpu") == ("bfloat16" if fast else "model")
    assert hardware.resolve_sample_dtype("model", "cpu") == "model"
    assert hardware.resolve_sample_dtype("bfloat16", "cpu") == "bfloat16"


_FAULTS = textwrap.dedent("""
    import resource, sys
    import exoalign  # first, as the CLI: passive OpenMP waits
    import torch
    from exoalign.hardware import keep_freed_memory
    applied = keep_freed_memory() if sys.argv[1] == "keep" else False
    for _ in range(8):  # 64 MiB blocks: their first touches fault in either case (glibc takes a few rounds
        torch.ones(1 << 24).sum()  # before it hands a freed block out again)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(16):
        torch.ones(1 << 24).sum()  # freed and allocated again
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux") or hardware._glibc() is None, reason="glibc only")
def test_kept_memory_is_not_faulted_in_again():
    """A 64 MiB block freed and allocated again, 16 times after 8 warm-up rounds: glibc's defaults map and unmap it
    each time (16 384 page faults of 4 KiB each), the kept settings serve it from the heap. The heap can still grow
    by a block now and then after the warm-up (2 blocks in 8 of 42 runs of 8 rounds here, 3 in two suite runs), so the
    bound is half of the defaults' faults, not none."""
    env = {k: v for k, v in os.environ.items() if k not in hardware.MALLOC_ENV and k != "LD_PRELOAD"}
    out = {}
    for mode in ("default", "keep"):
        res = subprocess.run([sys.executable, "-c", _FAULTS, mode], env=env, capture_output=True, text=True,
                             check=True)
        applied, faults = res.stdout.split()
        out[mode] = (applied == "True", int(faults))
    assert out["keep"][0] and not out["default"][0]
    pages = 16 * (1 << 26) // os.sysconf("SC_PAGE_SIZE")
    assert out["default"][1] > pages // 2  # the defaults fault the block in every time
    assert out["keep"][1] < out["default"][1] // 2, out  # the kept heap serves most rounds without a fault
