"""Training rows from whatever the Trainer was given: a path (every format ``load_rows`` reads), a list of dicts or a
``datasets.Dataset`` — validated by ``load_rows``, whose errors name an in-memory row by its index."""

from __future__ import annotations

import os
from typing import Any

from ..data import load_rows


def in_memory(source: Any) -> bool:
    """True for rows held in memory (anything but a path)."""
    return source is not None and not isinstance(source, (str, os.PathLike))


def load_any_rows(source: Any, kind: str, *, what: str, split: str = "train", tokenizer: Any = None,
                  columns: Any = None, preset: str | None = None) -> list[dict]:
    """Validated, normalised rows of ``source`` (see :func:`exoalign.data.load_rows` for ``kind``, ``columns`` and
    ``preset``); ``what`` names in-memory rows in errors (``train_data``, ``eval_data``)."""
    return load_rows(source, kind, split=split, tokenizer=tokenizer, columns=columns, preset=preset,
                     name=what if in_memory(source) else None)
