"""Reading raw rows from files, saved datasets and the hub; writing JSONL atomically and resumably.

Reading gives ``(rows, locations)``: the rows as plain dicts and, for each, the 1-based number that an error
message should name. For JSONL (and JSON-lines ``.json``) files that is the physical line, so a user can jump
to it; for JSON arrays, Parquet files and ``datasets`` sources it is the row number.

JSON text is parsed here line by line, not by ``datasets``, because ``datasets`` reports neither the line of a
syntax error nor which line a row came from. Parquet files, ``save_to_disk`` directories and hub names go
through ``datasets``.

Writing: :func:`write_rows` replaces a file atomically (``name.tmp`` then ``os.replace``), so a kill never
leaves a half-written output. :func:`append_rows` adds whole lines and fsyncs them, and
:func:`read_done_count` / :func:`truncate_torn` let a resumed stage skip the rows it already wrote.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ..errors import InputError

JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIXES = (".json",)
PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv", ".tsv")
_SUPPORTED = ".jsonl, .json, .parquet, .csv, a save_to_disk directory or a hub dataset name"
# Markers that `Dataset.save_to_disk` / `DatasetDict.save_to_disk` leave in their directory.
_SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
# owner/name or name, as on the hub; anything with a data-file suffix or path syntax is a local path.
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

Rows = list[dict[str, Any]]


# ------------------------------------------------------------------------------------------- reading
def iter_source(source: str | os.PathLike, *, split: str = "train") -> tuple[str, Iterator[tuple[dict[str, Any], int]]]:
    """The name to use in errors, and an iterator of ``(row, 1-based line or row number)`` in file order.

    A missing path, an unknown file type, an unreadable Parquet file or saved dataset and a hub dataset that
    cannot be loaded raise :class:`InputError` at once. Problems inside a JSON-lines file (bytes that are not
    UTF-8, malformed JSON, a line that is not an object, no rows at all) are raised by the iterator when it
    reaches them, so a caller that validates each row as it comes reports the first bad line of the file.
    """
    name = str(source)
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        return name, _numbered(_read_saved(path, split), name)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in JSONL_SUFFIXES:
            return name, _iter_json_lines(_read_bytes(path), name)
        if suffix in JSON_SUFFIXES:
            return name, _iter_json_file(_read_bytes(path), name, split)
        if suffix in PARQUET_SUFFIXES:
            return name, _numbered(_read_parquet(path), name)
        if suffix in CSV_SUFFIXES:
            return name, _numbered(_read_csv(path), name)
        raise InputError(f"unknown data file type '{path.suffix or path.name}'", file=name, fix=f"give {_SUPPORTED}")
    if _looks_like_hub_name(name):
        return name, _numbered(_read_hub(name, split), name)
    raise InputError("no such file or directory", file=name, fix="check the path (or give a hub dataset name)")


def read_source(source: str | os.PathLike, *, split: str = "train") -> tuple[Rows, list[int], str]:
    """:func:`iter_source` collected: ``(rows, line or row numbers, name for errors)``."""
    name, items = iter_source(source, split=split)
    pairs = list(items)
    return [row for row, _ in pairs], [line for _, line in pairs], name


def _looks_like_hub_name(name: str) -> bool:
    suffix = Path(name).suffix.lower()
    known = JSONL_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES + CSV_SUFFIXES + (".txt", ".arrow")
    return bool(_HUB_NAME.match(name)) and suffix not in known


def _read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read the file ({e.strerror})", file=str(path), fix="check the path and permissions") from None
    return data[3:] if data.startswith(b"\xef\xbb\xbf") else data  # a BOM some editors add: harmless, skip it


def _decode(raw: bytes, file: str, first_line: int) -> str:
    """``raw`` as UTF-8; a bad byte is reported with its own line (counted from ``first_line``) and column."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = raw.rfind(b"\n", 0, e.start) + 1
        raise InputError(
            f"bytes that are not UTF-8 (0x{raw[e.start]:02x} at column {e.start - line_start + 1})",
            file=file, line=first_line + raw.count(b"\n", 0, e.start), fix="re-save the file as UTF-8",
        ) from None


def _parse_json(text: str, file: str, line: int) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"malformed JSON ({e.msg} at column {e.colno})", file=file, line=line + e.lineno - 1,
                         fix="fix the JSON syntax there (JSONL: one object per line)") from None
    except RecursionError:
        raise InputError("JSON nested too deeply", file=file, line=line, fix="flatten the row") from None


def _iter_json_lines(data: bytes, file: str) -> Iterator[tuple[dict[str, Any], int]]:
    """One JSON object per non-blank line, decoded and parsed lazily, with its physical line number."""
    count = 0
    for i, raw in enumerate(data.split(b"\n"), start=1):
        text = _decode(raw, file, i)
        if not text.strip():
            continue
        value = _parse_json(text, file, i)
        if not isinstance(value, dict):
            raise InputError(f"a row must be a JSON object, got {json_type(value)}", file=file, line=i,
                             fix='write each row as {"prompt": ..., ...}')
        count += 1
        yield value, i
    if count == 0:
        raise InputError("the file is empty", file=file, fix="give a file with at least one row")


def _iter_json_file(data: bytes, file: str, split: str) -> Iterator[tuple[dict[str, Any], int]]:
    """A ``.json`` file: one array of rows, an object ``{split: [rows]}``, a single row, or JSON lines."""
    head = data.lstrip()[:1]
    if head == b"[":
        yield from _rows_from_array(_parse_json(_decode(data, file, 1), file, 1), file)
        return
    if head == b"{":
        # One pretty-printed object, or JSON lines: try the whole text first.
        try:
            whole = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            whole = None
        if isinstance(whole, dict):
            if isinstance(whole.get(split), list):
                yield from _rows_from_array(whole[split], file)
            elif whole and all(isinstance(v, list) and v and isinstance(v[0], dict) for v in whole.values()):
                # {"test": [rows], ...}: a file of splits without the one asked for, not a single row
                raise InputError(f"no split '{split}' (it has {', '.join(whole)})", file=file, field="split",
                                 fix=f"set the split to one of {', '.join(whole)}")
            else:
                yield whole, data.count(b"\n", 0, len(data) - len(data.lstrip())) + 1
            return
    yield from _iter_json_lines(data, file)


def _rows_from_array(value: Any, file: str) -> Iterator[tuple[dict[str, Any], int]]:
    """The rows of a parsed JSON array, numbered from 1 (errors name the row number)."""
    if not isinstance(value, list):
        raise InputError(f"expected a JSON array of rows, got {json_type(value)}", file=file, line=1,
                         fix="give a list of row objects or one object per line")
    if not value:
        raise InputError("the file holds no rows", file=file, fix="give at least one row")
    for i, row in enumerate(value, start=1):
        if not isinstance(row, dict):
            raise InputError(f"row {i} of the array must be a JSON object, got {json_type(row)}", file=file,
                             line=i, fix='write each row as {"prompt": ..., ...}')
        yield row, i


def json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _numbered(ds: Any, file: str) -> Iterator[tuple[dict[str, Any], int]]:
    """Rows of a ``datasets.Dataset``, numbered from 1."""
    if len(ds) == 0:
        raise InputError("the dataset holds no rows", file=file, fix="give a dataset with at least one row")
    for i, row in enumerate(ds.to_list(), start=1):
        yield row, i


def _read_parquet(path: Path) -> Any:
    import datasets

    try:
        # keep_in_memory: the rows become Python dicts right away; no arrow copy in the user's cache is needed.
        ds = datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
    except Exception as e:  # pyarrow raises many types for a corrupt file; all mean "not a Parquet file"
        raise InputError(f"cannot read Parquet ({_first_line(e)})", file=str(path),
                         fix="re-write the file with pandas/pyarrow/datasets to_parquet") from None
    return ds


def _read_csv(path: Path) -> Any:
    """A CSV (or tab-separated ``.tsv``) file with a header row; numbers become numbers, empty cells null."""
    import datasets

    lines = [line for line in _read_bytes(path).splitlines() if line.strip()]
    if len(lines) < 2:  # datasets' own message for these is about "instructions" and "generating"
        raise InputError("the file is empty" if not lines else "the file has a header but no rows", file=str(path),
                         fix="give a header row naming the fields, then one row per line")
    try:
        ds = datasets.Dataset.from_csv(str(path), keep_in_memory=True,
                                       sep="\t" if path.suffix.lower() == ".tsv" else ",")
    except Exception as e:  # pandas raises ParserError, UnicodeDecodeError, EmptyDataError...: all "not CSV"
        raise InputError(f"cannot read CSV ({_first_line(e)})", file=str(path),
                         fix="give a UTF-8 CSV file with a header row naming the fields") from None
    return ds


def _read_saved(path: Path, split: str) -> Any:
    import datasets

    file = str(path)
    if not any((path / m).exists() for m in _SAVED_MARKERS):
        raise InputError("the directory is not a dataset saved with save_to_disk", file=file,
                         fix=f"give {_SUPPORTED}")
    try:
        ds = datasets.load_from_disk(file)
    except Exception as e:  # a damaged arrow directory: same message whatever the exception type
        raise InputError(f"cannot load the saved dataset ({_first_line(e)})", file=file,
                         fix="re-save it with Dataset.save_to_disk") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise InputError(f"no split '{split}' (it has {', '.join(ds)})", file=file, field="split",
                             fix=f"set the split to one of {', '.join(ds)}")
        ds = ds[split]
    return ds


def _read_hub(name: str, split: str) -> Any:
    """``datasets.load_dataset(name, split=split)``; refused at once when the hub cannot be reached (offline,
    ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE``) and the dataset is not in the local cache — ``datasets`` would
    otherwise retry for about half a minute. A cached dataset is then loaded offline, without retries."""
    import datasets

    from ..hub import hub_offline, offline_mode

    why = hub_offline()
    if why and not _dataset_cached(name):
        raise InputError(f"no such local file, and hub dataset {name!r} cannot be downloaded: {why} and it is not in "
                         "the local cache", file=name,
                         fix="give a local .jsonl/.json/.parquet/.csv file or a save_to_disk directory; or connect to the hub")
    try:
        with offline_mode(bool(why)):
            ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, unknown repo, gated, missing split: one clear line for all of them
        raise InputError(
            f"no such local file, and loading it as a hub dataset failed ({_first_line(e)})", file=name,
            fix="check the path, or the hub name, split and network access",
        ) from None
    return ds


def _dataset_cached(name: str) -> bool:
    """Whether hub dataset ``name`` has files in the ``datasets`` cache or the hub cache."""
    import datasets
    from huggingface_hub import constants

    owner_name = name.split("/")
    places = [Path(datasets.config.HF_DATASETS_CACHE) / "___".join(owner_name),
              Path(constants.HF_HUB_CACHE) / ("datasets--" + "--".join(owner_name))]
    return any(p.is_dir() and any(p.iterdir()) for p in places)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


# ------------------------------------------------------------------------------------------- writing
def _default(value: Any) -> Any:
    """JSON for numpy scalars/arrays and tensors that stages put in rows."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write a {type(value).__name__} as JSON")


def _lines(rows: Iterable[Mapping[str, Any]]) -> str:
    out = []
    for row in rows:
        out.append(json.dumps(dict(row), ensure_ascii=False, default=_default) + "\n")
    return "".join(out)


def write_rows(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write ``rows`` as JSONL to ``path``, replacing it atomically (``path.tmp`` then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = _lines(rows)  # serialise first: a row that is not JSON must not leave a temp file behind
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk or a Ctrl-C must not leave name.tmp behind
        raise
    return path


def append_rows(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> int:
    """Append ``rows`` to the JSONL file ``path`` as whole lines, flushed and fsynced; returns how many.

    A torn last line left by a killed writer is cut off first (see :func:`truncate_torn`), so the new rows
    never glue onto half a row. All rows go out in one write, so a kill loses at most the last line.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = list(rows)
    text = _lines(rows)
    truncate_torn(path)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return len(rows)


def _complete_end(path: Path) -> tuple[int, int]:
    """(number of complete non-blank lines, byte offset just past the last newline) of ``path``."""
    count, end, offset, pending = 0, 0, 0, False
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            start = 0
            while (nl := chunk.find(b"\n", start)) != -1:
                if pending or chunk[start:nl].strip():
                    count += 1
                pending = False
                start = nl + 1
                end = offset + start
            pending = pending or bool(chunk[start:].strip())
            offset += len(chunk)
    return count, end


def read_done_count(path: str | os.PathLike, *, repair: bool = False) -> int:
    """How many complete rows (non-blank lines ending in a newline) ``path`` holds; 0 if it does not exist.

    A resumable stage skips that many inputs. A torn last line (a kill mid-write) is not counted; with
    ``repair=True`` it is also cut off the file so the next :func:`append_rows` starts on a clean line.
    """
    path = Path(path)
    if not path.exists():
        return 0
    if repair:
        truncate_torn(path)
    return _complete_end(path)[0]


def truncate_torn(path: str | os.PathLike) -> int:
    """Cut a torn (newline-less) last line off ``path``; returns the number of bytes removed."""
    path = Path(path)
    if not path.exists():
        return 0
    size = path.stat().st_size
    _, end = _complete_end(path)
    if end < size:
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    return size - end


def is_finite_number(value: Any) -> bool:
    """A real number (not a bool) that is neither NaN nor infinite, including ints too large for a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False
