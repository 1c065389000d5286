"""What this machine does fast, and the process settings that follow from it.

* :func:`fast_bf16` — whether bf16 matmuls run on the device's own units. On CPUs without them (AVX2-only
  machines such as AMD EPYC Zen 3, older Intel) oneDNN has no bf16 kernel and torch's fallback multiplies bf16
  ~8× *slower* than fp32 (SmolLM2's MLP projection, one thread, on an AMD EPYC Zen 3: 5.5 GFLOP/s against 47), so
  the demo's ``auto`` precision trains and samples in fp32 there, and an explicit bf16 setting is warned about
  once (:func:`warn_slow_bf16`).
* :func:`keep_freed_memory` — glibc's allocator set for a training process (below).

glibc and training: a training step frees and re-allocates the same gradients, optimizer temporaries, casts and
logits every step. glibc serves blocks of 32 MiB and more (smaller ones too, until its threshold adapts) from
fresh memory mappings and unmaps them when they are freed, and it gives the free top of its heap back to the
kernel: every step then faults the same memory in again, page by page (docs/speed.md: ~200 000 minor faults,
1.6-3 s of system time per ~14 CPU-seconds of a SmolLM2 step). :func:`keep_freed_memory` asks glibc, through
``mallopt``, to serve every block from its heap and to keep up to 2 GiB of freed memory: the settings the demo's
workers get from their environment (``exoalign.demo.jobs.WORKER_MALLOC``). A user's own choice wins: nothing is
changed when a ``MALLOC_*`` variable of glibc (or ``GLIBC_TUNABLES``) is set, under a preloaded jemalloc, tcmalloc
or mimalloc, or outside glibc. The settings are process-wide and trade memory given back to the system for
speed (a SmolLM2 training process peaks ~0.7 GB higher), so only exoalign's long CPU work applies them: the
trainer, the sample stage and the evaluation. Measured on an AMD EPYC (Zen 3) VM, where a page fault is dear
(docs/speed.md, "A sixth stop"): the throughput benchmark's SmolLM2 step 18.1 → 11.7 s, the demo's sample stage
45.4 / 40.5 → 39.0 / 35.4 s.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

KEPT_MALLOC_ENV = {
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(16 << 30),
    "MALLOC_TOP_PAD_": str(1 << 30),
}
"""The kept-memory settings as glibc reads them from the environment when a process starts (the demo's workers,
the throughput benchmark's): no block from a mapping of its own, trim above 16 GiB, 1 GiB of top padding."""
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1
MALLOC_SETTINGS = tuple((param, min(int(KEPT_MALLOC_ENV[name]), _INT_MAX)) for param, name in (
    (M_MMAP_MAX, "MALLOC_MMAP_MAX_"), (M_TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_"), (M_TOP_PAD, "MALLOC_TOP_PAD_")))
"""The same through ``mallopt`` in a running process (which takes a C ``int``: the trim threshold becomes 2 GiB)."""
MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
              "GLIBC_TUNABLES")
"""The user's own allocator settings: any of them set, :func:`keep_freed_memory` leaves glibc alone."""
OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

_malloc_state: bool | None = None
_warned: set[str] = set()


def resolve_sample_dtype(sample_dtype: str, device: torch.device | str | None = "cpu") -> str:
    """A sampling dtype with ``auto`` made concrete: ``bfloat16`` where :func:`fast_bf16`, else ``model`` (the
    model's own weights); any other value as given."""
    if sample_dtype != "auto":
        return sample_dtype
    return "bfloat16" if fast_bf16(device) else "model"


def fast_bf16(device: torch.device | str | None = "cpu") -> bool:
    """bf16 matmuls on the device's own units: on CPU oneDNN's bf16 (AVX-512 or AMX), on CUDA the GPU's."""
    import torch  # here, not at the top: the demo's worker pool imports this module without torch

    kind = torch.device(device).type if device is not None else "cpu"
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind != "cpu":
        return True  # other accelerators: their own business
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def warn_slow_bf16(device: torch.device | str | None, setting: str, fix: str) -> bool:
    """One warning per setting and process when bf16 was asked for where it is slow; returns whether it warned."""
    if fast_bf16(device) or setting in _warned:
        return False
    _warned.add(setting)
    log.warning("%s asks for bf16, but this CPU has no bf16 matmul units (AVX2 only): its bf16 matmuls run several "
                "times slower than fp32. Fix: %s", setting, fix)
    return True


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only (musl has no such symbol)  # noqa: B018
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    return libc


def user_allocator(environ: dict | None = None) -> str | None:
    """The user's own allocator choice, if any: a ``MALLOC_*`` variable or a preloaded other allocator."""
    env = os.environ if environ is None else environ
    for name in MALLOC_ENV:
        if name in env:
            return name
    preload = env.get("LD_PRELOAD", "")
    return next((a for a in OTHER_ALLOCATORS if a in preload), None)


def keep_freed_memory(environ: dict | None = None, *, device: torch.device | str | None = "cpu") -> bool:
    """Apply :data:`MALLOC_SETTINGS` once per process for work on ``device``; returns whether they are in effect
    (module text). Work on another device than the CPU leaves glibc alone (False)."""
    global _malloc_state
    if device is not None and str(device).split(":")[0] != "cpu":
        return False
    if _malloc_state is None:
        libc = None if user_allocator(environ) else _glibc()
        _malloc_state = libc is not None and all(libc.mallopt(p, v) == 1 for p, v in MALLOC_SETTINGS)
    return _malloc_state
