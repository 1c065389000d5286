"""Files that are never half-written, and the settings records that make the file-writing stages resumable.

Every file exoalign writes goes through :func:`atomic_write` (or its JSON and figure forms): the content goes to
``name.tmp`` (a sibling, so the rename stays on one file system) and is renamed over ``name`` with
``os.replace``; a kill leaves either the old file or the new one, and a failure removes the temporary file.
Directories (checkpoints, converted models) are built under a temporary name and renamed the same way by their
owners (``train/checkpoint.py``, ``zoo.py``).

Resumable stages (``sample``, ``score``, ``eval``) append rows to their output and keep the settings they were
started with beside it (:func:`write_meta`); :func:`check_meta` decides whether a rerun resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import ConfigError


def atomic_write(path: str | Path, data: str | bytes | Callable[[Path], None], *, suffix: str = "") -> Path:
    """Write ``data`` to ``path`` atomically: text, bytes, or a function that writes the temporary path it is
    given (``suffix`` keeps an extension such writers read the format from, e.g. ``.png`` for savefig)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp{suffix}")
    try:
        if isinstance(data, (str, bytes)):
            with open(tmp, "wb") as f:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())  # the rename must not overtake the content (a crash after it sees the file)
        else:
            data(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a full disk or a Ctrl-C must not leave name.tmp behind
    return path


def atomic_json(path: str | Path, obj: Any, *, indent: int | None = 1, sort_keys: bool = False,
                compact: bool = False) -> Path:
    """:func:`atomic_write` of ``obj`` as JSON (UTF-8, non-ASCII kept, NaN allowed, a final newline)."""
    text = json.dumps(obj, indent=None if compact else indent, sort_keys=sort_keys, ensure_ascii=False,
                      separators=(",", ":") if compact else None)
    return atomic_write(path, text + "\n")


def atomic_savefig(fig: Any, path: str | Path, **kwargs: Any) -> Path:
    """``fig.savefig`` through :func:`atomic_write` (the temporary name keeps the extension: it picks the format)."""
    path = Path(path)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, **kwargs), suffix=path.suffix)


# ------------------------------------------------------------------------------------ resumability
def fingerprint(value: Any) -> str:
    """A short stable hash of a JSON-able value (prompt lists, input rows) for the resume records."""
    text = json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def meta_path(output: str | Path) -> Path:
    return Path(str(output) + ".meta.json")


def check_meta(output: str | Path, meta: dict, *, overwrite: bool) -> bool:
    """Compare the settings of this run with those recorded beside ``output`` by an earlier run.

    Returns True when the run should resume (output present, same settings). With ``overwrite`` the old output
    is removed first. Different settings without ``overwrite`` → ConfigError, because mixing rows from two
    settings in one file would silently corrupt it. Nothing is written here: :func:`write_meta` records the
    settings just before the first rows are appended, so a run that fails before that leaves no file behind.
    """
    out, mp = Path(output), meta_path(output)
    if overwrite:
        for p in (out, mp):
            if p.exists():
                p.unlink()
    if not out.exists():
        return False
    try:
        old = json.loads(mp.read_text(encoding="utf-8")) if mp.exists() else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        old = None
    if mp.exists() and not isinstance(old, dict):
        # A damaged record: nothing says the rows in `output` were made with these settings.
        raise ConfigError(f"the settings record of {out} is unreadable", file=str(mp), field="output",
                          fix="pass overwrite=true to start afresh, or choose a new output")
    if old != meta:
        changed = sorted(k for k in set(meta) | set(old or {}) if (old or {}).get(k) != meta.get(k))
        raise ConfigError(
            f"exists and was written with other settings ({', '.join(changed) or 'unknown'})",
            file=str(out), field="output",
            fix="rerun with the same settings to resume, pass overwrite=true, or choose a new output",
        )
    return True


def write_meta(output: str | Path, meta: dict) -> None:
    """Record ``meta`` beside ``output`` (atomically) before the first rows of a fresh run are appended."""
    atomic_write(meta_path(output), json.dumps(meta, indent=1, sort_keys=True))
