"""Conversational rows: message lists rendered with the tokeniser's chat template."""

from __future__ import annotations

import copy
import json

import pytest

from exoalign.data import load_rows
from exoalign.errors import InputError

# A tiny template: each turn is "<role>content\n"; the generation prompt is "<assistant>".
TEMPLATE = (
    "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('the first turn cannot be the assistant') }}{% endif %}"
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
USER = {"role": "user", "content": "how was the film?"}
SYS = {"role": "system", "content": "be kind"}


def _a(text: str) -> dict:
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = TEMPLATE
    return tok


def _load(tmp_path, rows, kind, tok):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return load_rows(path, kind, tokenizer=tok)


def test_sft_messages_prompt_is_all_but_the_final_reply(tmp_path, chat_tokenizer):
    rows = _load(tmp_path, [{"messages": [SYS, USER, _a("great")], "id": 1}], "sft", chat_tokenizer)
    assert rows == [{"prompt": "<system>be kind\n<user>how was the film?\n<assistant>", "completion": "great", "id": 1}]


def test_prompt_kind_drops_a_final_reply(tmp_path, chat_tokenizer):
    rows = _load(tmp_path, [{"messages": [USER, _a("great")]}, {"prompt": [USER]}], "prompt", chat_tokenizer)
    assert [r["prompt"] for r in rows] == ["<user>how was the film?\n<assistant>"] * 2


def test_pair_explicit_and_implicit_prompt_give_the_same_row(tmp_path, chat_tokenizer):
    explicit = {"prompt": [USER], "chosen": [_a("loved it")], "rejected": [_a("dull")]}
    implicit = {"chosen": [USER, _a("loved it")], "rejected": [USER, _a("dull")]}
    rows = _load(tmp_path, [explicit, implicit], "pair", chat_tokenizer)
    expected = {"prompt": "<user>how was the film?\n<assistant>", "completions": ["loved it", "dull"], "rewards": None}
    assert rows == [expected, expected]


def test_group_with_messages_prompt_and_text_completions(tmp_path, chat_tokenizer):
    row = {"messages": [SYS, USER], "completions": ["a", "b", "c"], "rewards": [1, 2, 3]}
    rows = _load(tmp_path, [row], "preference", chat_tokenizer)
    assert rows[0]["prompt"] == "<system>be kind\n<user>how was the film?\n<assistant>"
    assert rows[0]["completions"] == ["a", "b", "c"] and rows[0]["rewards"] == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("row,kind,field,words", [
    ({"chosen": [USER, _a("x")], "rejected": [SYS, _a("y")]}, "pair", "rejected", "starts differently"),
    ({"messages": [USER, {"role": "user", "content": "?"}]}, "sft", "messages", "not the assistant"),
    ({"messages": [_a("hello"), _a("again")]}, "sft", "messages", "template rejected"),
    ({"prompt": "plain", "chosen": [USER, _a("x")], "rejected": [USER, _a("y")]}, "pair", "prompt", "earlier turns"),
    ({"messages": [USER, {"role": "assistant", "content": " "}]}, "sft", "messages[-1].content", "empty"),
    ({"messages": [USER, {"role": "assistant", "content": ["image"]}]}, "sft", "messages[1].content", "must be a string"),
    ({"messages": []}, "sft", "messages", "non-empty list"),
    ({"chosen": [_a("x")], "rejected": [_a("y")]}, "pair", "prompt", "missing"),
])
def test_bad_conversations(tmp_path, chat_tokenizer, row, kind, field, words):
    with pytest.raises(InputError) as e:
        _load(tmp_path, [row], kind, chat_tokenizer)
    assert (e.value.line, e.value.field) == (1, field)
    assert words in e.value.message


def test_tokenizer_without_chat_template_is_a_clear_error(tmp_path, tiny_tokenizer):
    with pytest.raises(InputError, match="the tokeniser has no chat template") as e:
        _load(tmp_path, [{"messages": [USER, _a("x")]}], "sft", tiny_tokenizer)
    assert e.value.field == "messages" and "plain-text" in e.value.fix
