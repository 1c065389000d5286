"""Reference-counting checks for the tests: what a dropped object still keeps alive without Python's cyclic
collector (an object held only by a reference cycle survives until the next full collection)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Iterable
from typing import Any


def alive_without_collector(holder: list[Any], watch: Callable[[Any], Iterable[Any]]) -> tuple[int, int]:
    """Watch (weakly) the objects ``watch(holder[0])`` names, empty ``holder`` (the caller's only strong reference)
    with the cyclic collector off, and return how many of them are still alive, and how many were watched."""
    refs = [weakref.ref(o) for o in watch(holder[0])]
    enabled = gc.isenabled()
    gc.disable()
    try:
        holder.clear()
        return sum(r() is not None for r in refs), len(refs)
    finally:
        if enabled:
            gc.enable()
