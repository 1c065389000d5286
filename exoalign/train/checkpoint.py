"""Atomic checkpoints: ``output_dir/checkpoint-{step}`` holds the model and tokeniser (``save_pretrained``,
safetensors), the accelerate training state (optimizer, scheduler, RNG) under ``state/``, and
``trainer_state.json`` (step, data position, counters).

A checkpoint is written into ``output_dir/.tmp-checkpoint-{step}``; the marker file ``COMPLETE`` is written
last, and the directory is then renamed to its final name. A process killed mid-write leaves only a ``.tmp-``
directory, which is never read (and is removed by the next save); a ``checkpoint-*`` directory without the
marker (copied half-way, a broken file system) is reported as torn and skipped.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from ..fileio import atomic_json

logger = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def _fsync_dir(path: Path) -> None:
    """Flush a directory entry (the rename) to disk where the OS allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is moved aside first and deleted afterwards."""
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def all_finite(model: torch.nn.Module) -> bool:
    """True when every parameter is finite (checked before anything is saved)."""
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def save_pretrained_atomic(model: torch.nn.Module, tokenizer: Any, final: Path, state_dict: dict | None = None,
                           extra: dict[str, Any] | None = None) -> Path:
    """``save_pretrained`` of model (safetensors) and tokeniser into ``final``, via a temp dir and a rename;
    ``extra`` maps file names to JSON objects written beside them (before the ``COMPLETE`` marker)."""
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    for name, obj in (extra or {}).items():
        atomic_json(tmp / name, obj)
    atomic_json(tmp / COMPLETE, {})
    _replace_dir(tmp, final)
    return final


def save_checkpoint(
    accelerator: Any, model: torch.nn.Module, tokenizer: Any, output_dir: Path, step: int, state: dict, total_limit: int | None
) -> Path:
    """Write ``checkpoint-{step}`` atomically (every process must call this: FSDP/DeepSpeed save collectively)."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "state"))
    state_dict = accelerator.get_state_dict(model)  # collective under FSDP / DeepSpeed ZeRO-3
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        atomic_json(tmp / STATE_FILE, state)
        # The marker is the last file written: its presence means everything above is on disk.
        atomic_json(tmp / COMPLETE, {"step": step})
        _replace_dir(tmp, final)
        prune(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def list_checkpoints(output_dir: Path, *, warn: bool = True) -> list[tuple[int, Path]]:
    """Complete checkpoints ``(step, path)`` in ``output_dir``, oldest first; torn ones are skipped with a warning."""
    found = []
    if not output_dir.is_dir():
        return found
    for path in output_dir.iterdir():
        m = _NAME.match(path.name)
        if not m or not path.is_dir():
            continue
        if not (path / COMPLETE).is_file() or not (path / STATE_FILE).is_file():
            if warn:
                logger.warning("skipping torn checkpoint %s (no %s marker: it was not completely written)", path, COMPLETE)
            continue
        found.append((int(m.group(1)), path))
    return sorted(found)


def last_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint in ``output_dir``, or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def prune(output_dir: Path, total_limit: int | None) -> None:
    """Delete the oldest complete checkpoints beyond ``total_limit``, and stale temp dirs of killed saves."""
    for path in output_dir.glob(".tmp-checkpoint-*"):
        shutil.rmtree(path, ignore_errors=True)
    if total_limit is None:
        return
    found = list_checkpoints(output_dir, warn=False)
    for _, path in found[: max(len(found) - total_limit, 0)]:
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(accelerator: Any, path: Path) -> dict:
    """Restore model, optimizer, scheduler and RNG states from ``path``; return its ``trainer_state.json``.

    accelerate reads the weights from safetensors and the other state files with ``torch.load(weights_only=True)``,
    which refuses pickled code; a damaged or foreign state is an input error naming the checkpoint.
    """
    try:
        accelerator.load_state(str(path / "state"))
        return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except Exception as e:  # unpickling refused, a truncated file, shapes of another model: the checkpoint is bad
        raise InputError(
            f"cannot load the training state ({type(e).__name__}: {' '.join(str(e).split())[:200]})",
            file=str(path), field="train.resume",
            fix=f"delete {path.name} to resume from the checkpoint before it, or start a new run",
        ) from None
