"""Property test: random (mostly malformed) rows and byte lines fed to load_rows give either a clean InputError
or exactly the rows an independent reference validator expects — never another exception."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from exoalign.data import load_rows
from exoalign.errors import InputError

KEYS = ["prompt", "promt", "chosen", "rejected", "completions", "completion", "rewards", "messages", "id", "Prompt"]
USED = {
    "pair": {"prompt", "chosen", "rejected", "rewards", "messages"},
    "group": {"prompt", "completions", "rewards", "messages"},
    "sft": {"prompt", "completion", "messages"},
    "prompt": {"prompt", "messages"},
}

texts = st.one_of(st.text(max_size=6), st.sampled_from(["ok", " ", "", "\ud800x", "日本"]))
numbers = st.one_of(st.integers(-3, 3), st.floats(allow_nan=True, allow_infinity=True), st.just(10**400), st.booleans())
scalars = st.one_of(st.none(), texts, numbers)
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                            st.dictionaries(texts, inner, max_size=2)), max_leaves=6)
values = st.one_of(texts, st.lists(texts, max_size=4), st.lists(numbers, max_size=4), json_values)
rows = st.dictionaries(st.sampled_from(KEYS), values, max_size=5)
# A line is a JSON row, a random JSON value, random bytes, or blank.
lines = st.one_of(
    rows.map(lambda r: json.dumps(r).encode("utf-8", "surrogatepass")),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=12),
    st.just(b""),
)


def _text(v) -> bool:
    if not isinstance(v, str) or not v.strip():
        return False
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _finite(v) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return abs(v) < 1e308 and not (isinstance(v, float) and math.isnan(v))


def _expected_row(row: dict, kind: str, require: bool) -> dict | None:
    """The normalised row per docs/data.md for plain-text rows without a tokeniser, or None if it is bad."""
    get = row.get
    if get("messages") is not None or not _text(get("prompt")):
        return None
    extras = {k: v for k, v in row.items() if k not in USED[kind]}
    if kind == "prompt":
        return {"prompt": row["prompt"], **extras}
    if kind == "sft":
        return {"prompt": row["prompt"], "completion": get("completion"), **extras} if _text(get("completion")) else None
    comps = [get("chosen"), get("rejected")] if kind == "pair" else get("completions")
    if not isinstance(comps, list) or len(comps) < 2 or not all(_text(c) for c in comps):
        return None
    rewards = get("rewards")
    if rewards is None:
        if require:
            return None
    elif not isinstance(rewards, list) or len(rewards) != len(comps) or not all(_finite(r) for r in rewards):
        return None
    else:
        rewards = [float(r) for r in rewards]
    return {"prompt": row["prompt"], "completions": comps, "rewards": rewards, **extras}


def _expected(data: bytes, kind: str, require: bool) -> tuple[list[dict] | None, int | None]:
    """(the normalised rows, None) for a good JSONL file, else (None, line of the first bad row or None)."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    out = []
    for line, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None, line
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            return None, line
        if not isinstance(value, dict):
            return None, line
        if kind == "preference":
            if value.get("completions") is not None:
                kind = "group"
            elif value.get("chosen") is not None or value.get("rejected") is not None:
                kind = "pair"
            else:
                return None, line  # neither format's fields: whichever is assumed, the row lacks them
        row = _expected_row(value, kind, require)
        if row is None:
            return None, line
        out.append(row)
    return (out, None) if out else (None, None)


def _check(data: bytes, kind: str, require: bool, path: Path) -> None:
    path.write_bytes(data)
    expected, bad_line = _expected(data, kind, require)
    try:
        got = load_rows(path, kind, require_rewards=require)
    except InputError as e:
        text = str(e)
        assert expected is None, f"rejected a good file: {text}"
        assert e.line == bad_line, f"expected line {bad_line}: {text}"
        assert "\n" not in text and text.startswith(str(path)) and e.fix
        event(f"InputError on field {e.field}")
        return
    assert expected is not None, f"accepted a bad file: {got}"
    assert got == expected
    event("loaded")


SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(file_lines=st.lists(lines, max_size=4), kind=st.sampled_from(["pair", "group", "sft", "prompt", "preference"]),
       require=st.booleans())
def test_random_lines_load_cleanly_or_fail_cleanly(file_lines, kind, require):
    with tempfile.TemporaryDirectory() as d:
        _check(b"\n".join(file_lines), kind, require, Path(d) / "rows.jsonl")


# Mostly well-formed rows of every kind with at most one field replaced, so the deeper checks are reached often.
words = st.sampled_from(["a", "b c", "the film"])


@st.composite
def near_valid(draw):
    row = {"prompt": draw(words)}
    shape = draw(st.sampled_from(["pair", "group", "sft"]))
    if shape == "pair":
        row.update(chosen=draw(words), rejected=draw(words))
        n = 2
    elif shape == "group":
        row["completions"] = draw(st.lists(words, min_size=2, max_size=4))
        n = len(row["completions"])
    else:
        row["completion"] = draw(words)
        n = 1
    if draw(st.booleans()):
        row["rewards"] = draw(st.lists(st.floats(-5, 5), min_size=n, max_size=n))
    if draw(st.booleans()):
        row[draw(st.sampled_from(KEYS))] = draw(values)
    return row


@SETTINGS
@given(file_rows=st.lists(near_valid(), min_size=1, max_size=4), kind=st.sampled_from(list(USED) + ["preference"]),
       require=st.booleans())
def test_near_valid_rows(file_rows, kind, require):
    data = "\n".join(json.dumps(r) for r in file_rows).encode()
    with tempfile.TemporaryDirectory() as d:
        _check(data, kind, require, Path(d) / "rows.jsonl")


@SETTINGS
@given(file_rows=st.lists(st.one_of(near_valid(), json_values), max_size=4), kind=st.sampled_from(["group", "pair", "sft"]))
def test_json_array_files(file_rows, kind):
    """The same rows as a JSON array (.json): the error names the row number, or the rows load as for JSONL."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "rows.json"
        path.write_text(json.dumps(file_rows))
        lines = "\n".join(json.dumps(r) for r in file_rows).encode()
        expected, bad_row = _expected(lines, kind, False)  # one row per line: line number = row number
        try:
            got = load_rows(path, kind)
        except InputError as e:
            assert expected is None and e.line == bad_row, str(e)
            return
        assert got == expected
