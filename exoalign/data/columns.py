"""Column maps: a published dataset's fields mapped onto ours (``data.columns``), with paths into nested records.

A map is ``{our field: path}`` (or ``{our field: [path, ...]}``, which builds a list from several paths). A path
names a field of the source row, with these steps:

* ``name`` — a top-level field; ``a.b`` — field ``b`` of the object ``a``;
* ``a[]`` — every item of the list ``a`` (so ``completions[].response`` is the list of each completion's
  ``response``);
* ``a[0]``, ``a[-1]`` — one item of a list.

Example, raw UltraFeedback (one instruction, four completions with scores)::

    data.columns={prompt: instruction, completions: completions[].response, rewards: completions[].overall_score}

On the command line that value is not valid YAML (``[`` inside a flow mapping), so it is also accepted as text
and parsed here (:func:`parse_columns`). The mapped fields replace the top-level source fields they were read
from; every other field of the row is kept.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import InputError

# One step of a path: a field name, then any number of [] / [i].
_SEGMENT = re.compile(r"^([^.\[\]]+)((?:\[-?\d*\])*)$")
_INDEX = re.compile(r"\[(-?\d*)\]")
FIX = "write data.columns={our_field: source_path, ...}, e.g. {prompt: instruction, completions: completions[].response}"


@dataclass(frozen=True)
class Path:
    """A parsed source path: ``steps`` are field names (str), ``None`` for ``[]`` and ints for ``[i]``."""

    text: str
    steps: tuple[str | int | None, ...]

    @property
    def root(self) -> str:
        return str(self.steps[0])


def parse_path(text: Any, field: str = "data.columns") -> Path:
    """``text`` as a :class:`Path`, or :class:`InputError` naming ``field``."""
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"a source path must be text, got {text!r}", field=field, fix=FIX)
    steps: list[str | int | None] = []
    for segment in text.strip().split("."):
        m = _SEGMENT.match(segment.strip())
        if not m:
            raise InputError(f"cannot read the path {text!r} (at {segment!r})", field=field,
                             fix="write fields joined by '.', with [] for every item of a list or [i] for one item")
        steps.append(m.group(1))
        steps.extend(None if i == "" else int(i) for i in _INDEX.findall(m.group(2)))
    return Path(text.strip(), tuple(steps))


def _split_top(text: str) -> list[str]:
    """``text`` split at the commas that are outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _unquote(text: str) -> str:
    text = text.strip()
    return text[1:-1] if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"" else text


def _parse_text(text: str, field: str) -> dict[str, Any]:
    """``{a: b, c: [d, e]}`` (braces optional) as a dict of strings and lists of strings."""
    body = text.strip()
    if body.startswith("{") and body.endswith("}"):
        body = body[1:-1]
    out: dict[str, Any] = {}
    for item in _split_top(body):
        key, sep, value = item.partition(":")
        if not sep or not key.strip() or not value.strip():
            raise InputError(f"cannot read {item!r} as our_field: source_path", field=field, fix=FIX)
        value = value.strip()
        if value.startswith("[") and value.endswith("]") and not _SEGMENT.match(value):
            out[_unquote(key)] = [_unquote(v) for v in _split_top(value[1:-1])]
        else:
            out[_unquote(key)] = _unquote(value)
    return out


def parse_columns(spec: Any, field: str = "data.columns") -> dict[str, str | list[str]] | None:
    """A column map from a mapping or its text form; every path is checked now, so a typo fails at start-up."""
    if spec is None or spec == "" or spec == {}:
        return None
    if isinstance(spec, str):
        spec = _parse_text(spec, field)
    if not isinstance(spec, Mapping):
        raise InputError(f"must be a mapping of our field to a source path, got {spec!r}"[:160], field=field, fix=FIX)
    out: dict[str, str | list[str]] = {}
    for key, value in spec.items():
        if not isinstance(key, str) or not key.strip():
            raise InputError(f"a target field must be a name, got {key!r}", field=field, fix=FIX)
        if isinstance(value, (list, tuple)):
            if not value:
                raise InputError(f"'{key}' maps to an empty list", field=field, fix="give one path or a list of paths")
            out[key] = [parse_path(v, f"{field}.{key}").text for v in value]
        else:
            out[key] = parse_path(value, f"{field}.{key}").text
    return out


class PathError(Exception):
    """A path that does not fit a row: ``where`` is the part of the path that failed, ``why`` the reason."""

    def __init__(self, where: str, why: str, keys: list[str] | None = None) -> None:
        super().__init__(f"{where}: {why}")
        self.where, self.why, self.keys = where, why, keys or []


def _describe(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "text", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def resolve(row: Mapping[str, Any], path: Path) -> Any:
    """The value ``path`` names in ``row``; :class:`PathError` when a field is missing or a step does not fit."""

    def walk(value: Any, steps: tuple[str | int | None, ...], done: str) -> Any:
        if not steps:
            return value
        step, rest = steps[0], steps[1:]
        if isinstance(step, str):
            here = f"{done}.{step}" if done else step
            if not isinstance(value, Mapping):
                raise PathError(done or "the row", f"is {_describe(value)}, so it has no field '{step}'")
            if value.get(step) is None:
                raise PathError(here, "missing", [k for k in value if isinstance(k, str)])
            return walk(value[step], rest, here)
        here = f"{done}[{'' if step is None else step}]"
        if not isinstance(value, list):
            raise PathError(done, f"is {_describe(value)}, not a list")
        if step is None:
            return [walk(item, rest, f"{done}[{i}]") for i, item in enumerate(value)]
        if not -len(value) <= step < len(value):
            raise PathError(here, f"out of range (the list has {len(value)} items)")
        return walk(value[step], rest, here)

    return walk(row, path.steps, "")


def apply_columns(row: Mapping[str, Any], columns: Mapping[str, str | list[str]], *, file: str,
                  line: int | None) -> dict[str, Any]:
    """``row`` with each mapped field set from its path; the top-level fields read are dropped, others kept."""
    paths = {k: [parse_path(v)] if isinstance(v, str) else [parse_path(p) for p in v] for k, v in columns.items()}
    values: dict[str, Any] = {}
    for target, group in paths.items():
        got = []
        for path in group:
            try:
                got.append(resolve(row, path))
            except PathError as e:
                close = difflib.get_close_matches(e.where.rsplit(".", 1)[-1], e.keys, n=1, cutoff=0.6)
                fix = (f"did you mean '{close[0]}'?" if close else
                       f"the row's fields are: {', '.join(e.keys)[:160]}" if e.keys else "check the path")
                raise InputError(f"mapped from '{path.text}' by data.columns, but '{e.where}' is {e.why}"
                                 if e.why == "missing" else
                                 f"mapped from '{path.text}' by data.columns, but '{e.where}' {e.why}",
                                 file=file, line=line, field=target, fix=fix) from None
        values[target] = got[0] if isinstance(columns[target], str) else got
    used = {p.root for group in paths.values() for p in group}
    out = {k: v for k, v in row.items() if k not in used}
    out.update(values)
    return out
