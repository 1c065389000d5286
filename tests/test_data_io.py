"""JSONL writing: atomic replace, whole-line appends, counting and repairing a torn last line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from exoalign.data import append_rows, load_rows, read_done_count, truncate_torn, write_rows

ROWS = [{"prompt": f"p{i}", "completions": ["a", "b"], "rewards": [float(i), -1.0]} for i in range(5)]


def test_write_rows_replaces_atomically_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "out.jsonl"
    write_rows(path, ROWS[:2])
    write_rows(path, ROWS[2:])
    assert [json.loads(x) for x in path.read_text().splitlines()] == ROWS[2:]
    assert [p.name for p in path.parent.iterdir()] == ["out.jsonl"]


def test_write_rows_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.jsonl"
    write_rows(path, ROWS[:1])
    with pytest.raises(TypeError):
        write_rows(path, [{"prompt": object()}])
    assert path.read_text() == json.dumps(ROWS[0]) + "\n"
    assert not (tmp_path / "out.jsonl.tmp").exists()


def test_numpy_and_tensor_values_are_written_as_json(tmp_path):
    path = write_rows(tmp_path / "o.jsonl", [{"prompt": "p", "completions": ["a", "b"],
                                              "rewards": np.array([0.5, 1.0]), "kl": torch.tensor(0.25), "n": np.int64(3)}])
    assert json.loads(path.read_text()) == {"prompt": "p", "completions": ["a", "b"], "rewards": [0.5, 1.0], "kl": 0.25, "n": 3}


def test_append_counts_and_resumes_after_a_torn_line(tmp_path):
    path = tmp_path / "out.jsonl"
    assert read_done_count(path) == 0
    assert append_rows(path, ROWS[:2]) == 2
    assert append_rows(path, ROWS[2:3]) == 1
    assert read_done_count(path) == 3
    # A writer killed mid-line leaves half a row without its newline.
    with open(path, "a") as f:
        f.write(json.dumps(ROWS[3])[:17])
    size = path.stat().st_size
    assert read_done_count(path) == 3 and path.stat().st_size == size  # counting alone changes nothing
    assert read_done_count(path, repair=True) == 3 and path.stat().st_size == size - 17
    assert truncate_torn(path) == 0
    append_rows(path, ROWS[3:])
    assert load_rows(path, "group") == ROWS


def test_append_repairs_a_torn_line_itself(tmp_path):
    path = tmp_path / "out.jsonl"
    append_rows(path, ROWS[:1])
    with open(path, "a") as f:
        f.write('{"prompt": "p1", "compl')
    append_rows(path, ROWS[1:2])
    assert load_rows(path, "group") == ROWS[:2]


def test_done_count_ignores_blank_lines_and_spans_read_chunks(tmp_path):
    path = tmp_path / "big.jsonl"
    line = json.dumps({"prompt": "x" * 5000, "completions": ["a", "b"]}) + "\n"
    path.write_text("\n" + line * 300 + "\n  \n" + line[:100])  # > 1 MiB: lines cross chunk boundaries
    assert read_done_count(path) == 300
    assert truncate_torn(path) == 100
    assert path.read_text().endswith("\n  \n")
