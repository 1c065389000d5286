"""exoalign's log lines on stderr: the CLI sets them up for every command, the Trainer unless the application did."""

from __future__ import annotations

import logging
import os
import sys


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (pytest and notebooks swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def setup_logging() -> None:
    """INFO messages of exoalign on stderr from the main process only (others print warnings and errors)."""
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)
    log = logging.getLogger("exoalign")
    if not log.handlers:
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False


def ensure_logging() -> None:
    """:func:`setup_logging` unless the application gave the ``exoalign`` logger handlers of its own (as transformers
    does for its logger: its lines reach stderr whatever the root logger is set to)."""
    if not logging.getLogger("exoalign").handlers:
        setup_logging()
