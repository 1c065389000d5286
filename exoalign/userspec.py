"""A user's own function named as ``module:function`` or ``path/to/file.py:function`` (oracles, losses).

Imported only from the spec the user wrote; a module in the working directory can be named, as with
``python -m``. Every failure (no such file, an import error or a module failing at import, a missing or
non-callable attribute) is the user's input: one line with the field and the fix, as ``error_type``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import InputError


def import_callable(spec: str, *, what: str, field: str, fix: str, error_type: type[InputError] = InputError,
                    callable_fix: str | None = None) -> Callable[..., Any]:
    """The callable ``spec`` names; ``what`` ("oracle", "loss") words the messages, ``callable_fix`` the fix when
    the attribute is not callable (default ``fix``)."""
    module_name, sep, func_name = spec.rpartition(":")
    if not sep or not module_name or not func_name:
        raise error_type(f"cannot read {what} spec {spec!r}", field=field, fix=fix)
    try:
        if module_name.endswith(".py"):
            path = Path(os.path.expanduser(module_name))
            if not path.is_file():
                raise error_type(f"{what} file {module_name!r} not found", field=field, fix=fix)
            where = importlib.util.spec_from_file_location(f"_exoalign_{what}_{path.stem}", path)
            assert where is not None and where.loader is not None
            module = importlib.util.module_from_spec(where)
            where.loader.exec_module(module)
        else:
            added = os.getcwd() not in sys.path
            if added:  # like `python -m`, a module in the working directory can be named
                sys.path.insert(0, os.getcwd())
            try:
                module = importlib.import_module(module_name)
            finally:
                if added:
                    sys.path.remove(os.getcwd())
    except InputError:
        raise
    except Exception as e:  # ImportError, SyntaxError, the module failing at import: all the user's input
        raise error_type(f"cannot import {what} module {module_name!r} ({type(e).__name__}: {e})".splitlines()[0],
                         field=field, fix=fix) from None
    fn = getattr(module, func_name, None)
    if fn is None:
        raise error_type(f"module {module_name!r} has no attribute {func_name!r}", field=field, fix=fix)
    if not callable(fn):
        raise error_type(f"{spec!r} is not callable", field=field, fix=callable_fix or fix)
    return fn
