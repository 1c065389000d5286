"""load_rows: every format and source loads to the normalised rows; every kind of bad row names its line and field."""

from __future__ import annotations

import copy
import json
import math

import pytest

from exoalign.data import load_rows, write_rows
from exoalign.errors import InputError

PAIRS = [
    {"prompt": "the movie was", "chosen": "great fun", "rejected": "a bore", "id": 7},
    {"prompt": "i hated", "chosen": "nothing", "rejected": "the ending"},
]
GROUPS = [
    {"prompt": "a delightful", "completions": ["story", "mess", "cast"], "rewards": [1.5, -2, 0.25]},
    {"prompt": "what a", "completions": ["surprise", "waste"], "rewards": [3, -3], "source": "demo"},
]


def _write(tmp_path, text: str | bytes, name: str = "rows.jsonl"):
    path = tmp_path / name
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8")
    else:
        path.write_bytes(text)
    return path


def _jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


# ------------------------------------------------------------------------------------------ good rows
def test_pairs_normalise_to_groups_of_two_keeping_extras(tmp_path):
    rows = load_rows(_write(tmp_path, _jsonl(PAIRS)), "pair")
    assert rows == [
        {"prompt": "the movie was", "completions": ["great fun", "a bore"], "rewards": None, "id": 7},
        {"prompt": "i hated", "completions": ["nothing", "the ending"], "rewards": None},
    ]


def test_groups_rewards_become_floats_and_preference_detects_each_format(tmp_path):
    group_file = _write(tmp_path, _jsonl(GROUPS), "g.jsonl")
    rows = load_rows(group_file, "group", require_rewards=True)
    assert rows[0]["rewards"] == [1.5, -2.0, 0.25] and all(isinstance(r, float) for r in rows[0]["rewards"])
    assert rows[1] == {"prompt": "what a", "completions": ["surprise", "waste"], "rewards": [3.0, -3.0], "source": "demo"}
    assert load_rows(group_file, "preference") == rows
    pair_file = _write(tmp_path, _jsonl(PAIRS), "p.jsonl")
    assert load_rows(pair_file, "preference") == load_rows(pair_file, "pair")


def test_group_without_rewards_and_pair_with_rewards(tmp_path):
    rows = load_rows(_write(tmp_path, _jsonl([{"prompt": "p", "completions": ["a", "b"], "rewards": None}])), "group")
    assert rows[0]["rewards"] is None
    pair = dict(PAIRS[1], rewards=[1, 0])
    assert load_rows(_write(tmp_path, _jsonl([pair]), "p.jsonl"), "pair", require_rewards=True)[0]["rewards"] == [1.0, 0.0]


def test_sft_and_prompt_kinds(tmp_path):
    path = _write(tmp_path, _jsonl([{"prompt": "say", "completion": "hello", "n": 1}]))
    assert load_rows(path, "sft") == [{"prompt": "say", "completion": "hello", "n": 1}]
    assert load_rows(path, "prompt") == [{"prompt": "say", "completion": "hello", "n": 1}]  # unused fields kept
    assert load_rows(_write(tmp_path, _jsonl(GROUPS), "g.jsonl"), "prompt")[1]["prompt"] == "what a"


def test_blank_lines_bom_and_crlf_are_accepted(tmp_path):
    text = "\n" + json.dumps(PAIRS[0]) + "\r\n\n   \n" + json.dumps(PAIRS[1]) + "\r\n"
    rows = load_rows(_write(tmp_path, b"\xef\xbb\xbf" + text.encode()), "pair")
    assert [r["prompt"] for r in rows] == ["the movie was", "i hated"]


def test_json_array_json_lines_split_object_and_single_object(tmp_path):
    expected = load_rows(_write(tmp_path, _jsonl(PAIRS)), "pair")
    assert load_rows(_write(tmp_path, json.dumps(PAIRS, indent=2), "a.json"), "pair") == expected
    assert load_rows(_write(tmp_path, _jsonl(PAIRS), "b.json"), "pair") == expected
    split_file = _write(tmp_path, json.dumps({"train": PAIRS[:1], "test": PAIRS[1:]}), "c.json")
    assert load_rows(split_file, "pair", split="test") == expected[1:]
    with pytest.raises(InputError, match="no split 'dev' \\(it has train, test\\)"):
        load_rows(split_file, "pair", split="dev")
    assert load_rows(_write(tmp_path, json.dumps(PAIRS[0], indent=1), "d.json"), "pair") == expected[:1]


def test_write_rows_round_trip_with_unicode(tmp_path):
    rows = [{"prompt": "café ☕ \u2028 end", "completions": ["ünï", "코드"], "rewards": [0.5, -1e-9], "meta": {"k": [1]}}]
    path = write_rows(tmp_path / "out" / "g.jsonl", rows)
    assert load_rows(path, "group") == rows
    assert not (tmp_path / "out" / "g.jsonl.tmp").exists()


def test_parquet_round_trip_and_bad_row_number(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "g.parquet"
    table = [dict(g, source=g.get("source")) for g in GROUPS]  # from_list takes its columns from the first row
    datasets.Dataset.from_list(table).to_parquet(str(path))
    rows = load_rows(path, "group")
    assert [r["completions"] for r in rows] == [g["completions"] for g in GROUPS]
    assert rows[1]["rewards"] == [3.0, -3.0] and rows[1]["source"] == "demo"
    assert rows[0]["source"] is None  # a null extra field is kept as it is
    bad = copy.deepcopy(table) + [{"prompt": "x", "completions": ["a", "b"], "rewards": [1.0, math.nan]}]
    datasets.Dataset.from_list(bad).to_parquet(str(path))
    with pytest.raises(InputError) as e:
        load_rows(path, "group")
    assert (e.value.line, e.value.field) == (3, "rewards[1]")


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    table = [dict(p, id=p.get("id")) for p in PAIRS]  # every row has every column in a dataset
    datasets.Dataset.from_list(table).save_to_disk(str(tmp_path / "one"))
    expected = load_rows(_write(tmp_path, _jsonl(table)), "pair")
    assert load_rows(tmp_path / "one", "pair") == expected
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(table[:1]), "test": datasets.Dataset.from_list(table[1:])})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert load_rows(tmp_path / "dict", "pair", split="test") == expected[1:]
    with pytest.raises(InputError, match="no split 'validation'") as e:
        load_rows(tmp_path / "dict", "pair", split="validation")
    assert e.value.field == "split"
    (tmp_path / "plain").mkdir()
    with pytest.raises(InputError, match="save_to_disk"):
        load_rows(tmp_path / "plain", "pair")


def test_unreachable_hub_name_is_a_clean_input_error():
    # conftest sets HF_DATASETS_OFFLINE=1, so this fails at once instead of retrying the network.
    with pytest.raises(InputError, match="hub dataset") as e:
        load_rows("nobody-here/no-such-dataset", "pair")
    assert e.value.file == "nobody-here/no-such-dataset"


def test_unknown_kind_and_file_type(tmp_path):
    with pytest.raises(InputError, match="did you mean 'pair'") as e:
        load_rows(_write(tmp_path, _jsonl(PAIRS)), "pairs")
    assert e.value.field == "kind"
    with pytest.raises(InputError, match="unknown data file type"):
        load_rows(_write(tmp_path, "a,b\n", "rows.txt"), "pair")


# ------------------------------------------------------------------------------------------ bad rows
OK_PAIR = json.dumps(PAIRS[1])
OK_GROUP = json.dumps(GROUPS[0])

BAD = [
    # (id, kind, lines, line, field, words in the message)
    ("missing-chosen", "pair", [OK_PAIR, '{"prompt": "p", "rejected": "r"}'], 2, "chosen", "missing"),
    ("misspelt-prompt", "pair", ['{"promt": "p", "chosen": "c", "rejected": "r"}'], 1, "prompt", "'promt'"),
    ("misspelt-completions", "group", [OK_GROUP, '{"prompt": "p", "completion": ["a", "b"]}'], 2, "completions", "'completion'"),
    ("prompt-not-string", "pair", ['{"prompt": 5, "chosen": "c", "rejected": "r"}'], 1, "prompt", "a number"),
    ("empty-chosen", "pair", [OK_PAIR, OK_PAIR, '{"prompt": "p", "chosen": "  ", "rejected": "r"}'], 3, "chosen", "empty"),
    ("empty-prompt", "sft", ['{"prompt": "", "completion": "c"}'], 1, "prompt", "empty"),
    ("one-completion", "group", ['{"prompt": "p", "completions": ["a"]}'], 1, "completions", "at least 2"),
    ("completions-not-list", "group", ['{"prompt": "p", "completions": "ab"}'], 1, "completions", "a string"),
    ("completion-int", "group", ['{"prompt": "p", "completions": ["a", 3]}'], 1, "completions[1]", "a number"),
    ("completion-empty", "group", ['{"prompt": "p", "completions": ["", "b"]}'], 1, "completions[0]", "empty"),
    ("rewards-length", "group", [OK_GROUP, '{"prompt": "p", "completions": ["a", "b"], "rewards": [1]}'], 2, "rewards", "has 1 values"),
    ("rewards-nan", "group", ['{"prompt": "p", "completions": ["a", "b"], "rewards": [1, NaN]}'], 1, "rewards[1]", "not finite"),
    ("rewards-inf", "group", ['{"prompt": "p", "completions": ["a", "b"], "rewards": [-Infinity, 1]}'], 1, "rewards[0]", "not finite"),
    ("rewards-overflow", "group", ['{"prompt": "p", "completions": ["a", "b"], "rewards": [1e999, 1]}'], 1, "rewards[0]", "not finite"),
    ("rewards-huge-int", "group", ['{"prompt": "p", "completions": ["a", "b"], "rewards": [1' + "0" * 400 + ', 1]}'], 1, "rewards[0]", "not finite"),
    ("rewards-string", "group", ['{"prompt": "p", "completions": ["a", "b"], "rewards": ["1", 2]}'], 1, "rewards[0]", "a string"),
    ("rewards-bool", "group", ['{"prompt": "p", "completions": ["a", "b"], "rewards": [true, 2]}'], 1, "rewards[0]", "a boolean"),
    ("rewards-not-list", "group", ['{"prompt": "p", "completions": ["a", "b"], "rewards": 2}'], 1, "rewards", "a number"),
    ("pair-rewards-length", "pair", ['{"prompt": "p", "chosen": "a", "rejected": "b", "rewards": [1, 2, 3]}'], 1, "rewards", "has 3"),
    ("sft-missing-completion", "sft", ['{"prompt": "p", "answer": "c"}'], 1, "completion", "missing"),
    ("prompt-missing", "prompt", ['{"text": "p"}', '{"prompt": "q"}'], 1, "prompt", "missing"),
    ("not-an-object", "pair", [OK_PAIR, "[1, 2]"], 2, None, "an array"),
    ("malformed-json", "pair", [OK_PAIR, "", '{"prompt": "p", "chosen": "c" "rejected": "r"}'], 3, None, "malformed JSON"),
    ("truncated-json", "pair", [OK_PAIR, '{"prompt": "p", "chos'], 2, None, "malformed JSON"),
    ("mixed-preference", "preference", [OK_GROUP, OK_PAIR], 2, "chosen", "pair row"),
    ("group-row-in-pair-file", "preference", [OK_PAIR, OK_GROUP], 2, "completions", "group row"),
    ("messages-without-tokenizer", "sft", ['{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}'], 1, "messages", "chat template"),
    ("message-without-role", "sft", ['{"messages": [{"content": "hi"}]}'], 1, "messages[0]", "no 'role'"),
    ("prompt-and-messages", "group", ['{"prompt": "p", "messages": [{"role": "user", "content": "hi"}], "completions": ["a", "b"]}'], 1, "messages", "together"),
    ("messages-as-text", "sft", ['{"completion": "c", "messages": "hi"}'], 1, "messages", "list of messages"),
    ("lone-surrogate", "pair", ['{"prompt": "bad \\ud800", "chosen": "c", "rejected": "r"}'], 1, "prompt", "surrogate"),
]


@pytest.mark.parametrize("kind,lines,line,field,words", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_row_names_line_and_field(tmp_path, kind, lines, line, field, words):
    path = _write(tmp_path, "\n".join(lines) + "\n")
    with pytest.raises(InputError) as e:
        load_rows(path, kind)
    err = e.value
    assert (err.file, err.line, err.field) == (str(path), line, field)
    assert words in err.message and err.fix
    text = str(err)
    assert "\n" not in text and text.startswith(f"{path}:{line}: ")


def test_require_rewards_names_the_row_without_them(tmp_path):
    path = _write(tmp_path, _jsonl([GROUPS[0], {"prompt": "p", "completions": ["a", "b"]}]))
    with pytest.raises(InputError, match="exoalign score") as e:
        load_rows(path, "group", require_rewards=True)
    assert (e.value.line, e.value.field) == (2, "rewards")
    with pytest.raises(InputError) as e:
        load_rows(_write(tmp_path, _jsonl(PAIRS), "p.jsonl"), "preference", require_rewards=True)
    assert (e.value.line, e.value.field) == (1, "rewards")


def test_bad_row_in_json_array_names_the_row_number(tmp_path):
    rows = [PAIRS[0], PAIRS[1], {"prompt": "p", "chosen": "c"}]
    with pytest.raises(InputError) as e:
        load_rows(_write(tmp_path, json.dumps(rows, indent=2), "rows.json"), "pair")
    assert (e.value.line, e.value.field) == (3, "rejected")
    with pytest.raises(InputError, match="malformed JSON") as e:
        load_rows(_write(tmp_path, '[\n {"prompt": "p"},\n {"prompt" "q"}\n]', "broken.json"), "pair")
    assert e.value.line == 3


@pytest.mark.parametrize("raw,line", [
    (b'{"prompt": "caf\xe9", "chosen": "c", "rejected": "r"}\n', 1),
    (OK_PAIR.encode() + b'\n\n{"prompt": "p", "chosen": "\xff\xfe", "rejected": "r"}\n', 3),
    (b"\xef\xbb\xbf" + OK_PAIR.encode() + b'\n\x80\n', 2),
])
def test_non_utf8_bytes_name_their_line(tmp_path, raw, line):
    with pytest.raises(InputError, match="not UTF-8") as e:
        load_rows(_write(tmp_path, raw), "pair")
    assert e.value.line == line and "UTF-8" in e.value.fix


@pytest.mark.parametrize("content", ["", "\n\n  \n", "\ufeff"])
def test_empty_file(tmp_path, content):
    with pytest.raises(InputError, match="empty"):
        load_rows(_write(tmp_path, content), "group")


def test_empty_json_array_and_missing_file(tmp_path):
    with pytest.raises(InputError, match="no rows"):
        load_rows(_write(tmp_path, "[]", "a.json"), "pair")
    with pytest.raises(InputError, match="no such file") as e:
        load_rows(tmp_path / "nope.jsonl", "pair")
    assert e.value.file == str(tmp_path / "nope.jsonl")
