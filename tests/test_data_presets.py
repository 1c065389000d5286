"""Published datasets as they are (issue 21 item 3): column maps, presets, scores as rewards, CSV, rows in
memory, and errors for a near-miss schema that name the preset or the column map that fits."""

from __future__ import annotations

import json

import datasets
import pytest

from exoalign.data import load_rows, parse_columns
from exoalign.data.columns import parse_path, resolve
from exoalign.data.presets import split_hh
from exoalign.errors import InputError

SENTENCES = [
    "the movie was great and the acting was wonderful",
    "the film was terrible and the plot was boring",
    "a delightful story with a charming cast",
    "an awful mess with a dull script and bad jokes",
]
ISSUE_COLUMNS = "{prompt: instruction, completions: completions[].response, rewards: completions[].overall_score}"


def hh_rows(n: int = 2) -> list[dict]:
    """Rows shaped like Anthropic/hh-rlhf: two whole dialogues that differ only in the final reply."""
    out = []
    for i in range(n):
        a, b = SENTENCES[i % 4], SENTENCES[(i + 1) % 4]
        dialogue = f"\n\nHuman: tell me about film {i}\n\nAssistant: {a}\n\nHuman: and then?\n\nAssistant:"
        out.append({"chosen": f"{dialogue} {a}", "rejected": f"{dialogue} {b} "})
    return out


def ultrafeedback_rows(n: int = 2) -> list[dict]:
    """Rows shaped like openbmb/UltraFeedback: an instruction and four completions with scores."""
    return [{
        "source": "evol_instruct", "instruction": f"review film {i}", "models": ["a", "b", "c", "d"],
        "completions": [{"model": m, "response": SENTENCES[(i + j) % 4], "overall_score": float(j),
                         "annotations": {"helpfulness": {"Rating": str(j)}}} for j, m in enumerate("abcd")],
    } for i in range(n)]


def binarized_rows(n: int = 2) -> list[dict]:
    """Rows shaped like HuggingFaceH4/ultrafeedback_binarized: prompt text, the conversations, the scores."""
    out = []
    for i in range(n):
        user = {"role": "user", "content": f"review film {i}"}
        chosen = [user, {"role": "assistant", "content": SENTENCES[i % 4]}]
        rejected = [user, {"role": "assistant", "content": SENTENCES[(i + 1) % 4]}]
        out.append({"prompt": user["content"], "prompt_id": f"id{i}", "chosen": chosen, "rejected": rejected,
                    "messages": chosen, "score_chosen": 8.0, "score_rejected": 3.5})
    return out


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------- column maps
def test_paths_reach_into_lists_of_records():
    row = ultrafeedback_rows(1)[0]
    assert resolve(row, parse_path("completions[].response")) == SENTENCES[:4]
    assert resolve(row, parse_path("completions[-1].overall_score")) == 3.0
    assert resolve(row, parse_path("completions[0].annotations.helpfulness.Rating")) == "0"
    assert parse_path("a[][2].b").steps == ("a", None, 2, "b")
    with pytest.raises(InputError, match="cannot read the path"):
        parse_path("completions[x].response")


def test_the_command_line_text_form_of_a_column_map():
    """``data.columns={... completions[].response ...}`` is not YAML, so its text is parsed by exoalign."""
    assert parse_columns(ISSUE_COLUMNS) == {"prompt": "instruction", "completions": "completions[].response",
                                            "rewards": "completions[].overall_score"}
    assert parse_columns("{rewards: [score_a, score_b], prompt: 'q'}") == {"rewards": ["score_a", "score_b"], "prompt": "q"}
    with pytest.raises(InputError, match="our_field: source_path"):
        parse_columns("{prompt instruction}")


def test_raw_ultrafeedback_through_columns_and_preset_is_a_scored_group_of_four(tmp_path):
    path = _jsonl(tmp_path / "uf.jsonl", ultrafeedback_rows())
    rows = load_rows(path, "preference", columns=ISSUE_COLUMNS, require_rewards=True)
    assert rows[0]["prompt"] == "review film 0" and rows[0]["completions"] == SENTENCES[:4]
    assert rows[0]["rewards"] == [0.0, 1.0, 2.0, 3.0] and rows[0]["source"] == "evol_instruct"
    assert "instruction" not in rows[0]  # a field read by the map is replaced by ours
    assert load_rows(path, "preference", preset="ultrafeedback") == rows
    assert load_rows(path, "prompt", preset="ultrafeedback")[1]["prompt"] == "review film 1"


def test_a_map_that_does_not_fit_names_the_row_field_and_close_key(tmp_path):
    path = _jsonl(tmp_path / "uf.jsonl", ultrafeedback_rows())
    with pytest.raises(InputError) as e:
        load_rows(path, "group", columns={"prompt": "instructoin", "completions": "completions[].response"})
    assert e.value.line == 1 and e.value.field == "prompt" and "did you mean 'instruction'" in str(e.value)
    with pytest.raises(InputError) as e:
        load_rows(path, "group", columns={"prompt": "instruction", "completions": "completions[].text"})
    assert "completions[0].text" in str(e.value) and "response" in str(e.value)


# ------------------------------------------------------------------------------------------ presets
def test_hh_rlhf_splits_the_implicit_prompt_at_the_last_assistant_turn(tmp_path):
    path = _jsonl(tmp_path / "hh.jsonl", hh_rows())
    rows = load_rows(path, "preference", preset="hh-rlhf")
    assert rows[0]["prompt"] == ("Human: tell me about film 0\n\nAssistant: " + SENTENCES[0] +
                                 "\n\nHuman: and then?\n\nAssistant:")
    assert rows[0]["completions"] == [" " + SENTENCES[0], " " + SENTENCES[1]] and rows[0]["rewards"] is None
    sft = load_rows(path, "sft", preset="hh-rlhf")
    assert sft[0] == {"prompt": rows[0]["prompt"], "completion": " " + SENTENCES[0]}
    assert split_hh("\n\nHuman: a", "\n\nHuman: b") is None


def test_binarized_rows_are_pairs_scored_by_score_chosen_and_score_rejected(tmp_path, chat_tokenizer):
    path = _jsonl(tmp_path / "ufb.jsonl", binarized_rows())
    rows = load_rows(path, "preference", preset="ultrafeedback-binarized", tokenizer=chat_tokenizer)
    assert rows[0]["prompt"] == "<|user|>review film 0\n<|assistant|>"
    assert rows[0]["completions"] == SENTENCES[:2] and rows[0]["rewards"] == [8.0, 3.5]
    assert rows[0]["prompt_id"] == "id0" and "messages" not in rows[0] and "score_chosen" not in rows[0]
    assert load_rows(path, "prompt", preset="ultrafeedback-binarized")[0]["prompt"] == "review film 0"
    sft = load_rows(path, "sft", preset="ultrafeedback-binarized", tokenizer=chat_tokenizer)[0]
    assert (sft["prompt"], sft["completion"]) == (rows[0]["prompt"], SENTENCES[0])


def test_scores_of_a_plain_pair_are_its_rewards(tmp_path):
    pair = {"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 2, "score_rejected": 7.5}
    assert load_rows([pair], "pair", require_rewards=True)[0]["rewards"] == [2.0, 7.5]
    with pytest.raises(InputError) as e:
        load_rows([{**pair, "score_rejected": None}], "pair")
    assert e.value.field == "score_rejected" and "give both scores" in str(e.value)


def test_shp_and_pku_saferlhf_pick_the_preferred_response():
    shp = {"history": "q", "human_ref_A": "a", "human_ref_B": "b", "labels": 0, "score_A": 3, "score_B": 9}
    assert load_rows([shp], "pair", preset="shp")[0]["completions"] == ["b", "a"]
    pku = {"prompt": "q", "response_0": "a", "response_1": "b", "better_response_id": 1, "safer_response_id": 0}
    assert load_rows([pku], "pair", preset="pku-saferlhf")[0]["completions"] == ["b", "a"]


def test_unknown_preset_suggests_the_close_one(tmp_path):
    with pytest.raises(InputError, match="did you mean 'ultrafeedback-binarized'"):
        load_rows(hh_rows(), "pair", preset="ultrafeedback_binarized")


# ----------------------------------------------------------------------------- near-miss schemas
@pytest.mark.parametrize(("rows", "kind", "preset"), [
    (ultrafeedback_rows(), "preference", "ultrafeedback"),  # was: "completions[0] must be a string ... give text"
    (hh_rows(), "preference", "hh-rlhf"),  # was: "field 'prompt': missing"
    (binarized_rows(), "preference", "ultrafeedback-binarized"),
])
def test_a_published_schema_without_its_preset_names_the_preset(tmp_path, rows, kind, preset):
    with pytest.raises(InputError) as e:
        load_rows(_jsonl(tmp_path / "x.jsonl", rows), kind)
    assert e.value.line == 1 and f"data.preset={preset}" in str(e.value), str(e.value)


def test_other_field_names_get_a_column_map():
    with pytest.raises(InputError) as e:
        load_rows([{"question": "q", "chosen": "a", "rejected": "b"}], "pair")
    assert e.value.file == "rows[0]" and e.value.field == "prompt" and "data.columns={prompt: question}" in str(e.value)
    with pytest.raises(InputError) as e:
        load_rows([{"prompt": "q", "outputs": [{"text": "a", "score": 1}, {"text": "b", "score": 2}]}], "group")
    assert "data.columns={completions: outputs[].text, rewards: outputs[].score}" in str(e.value), str(e.value)


# ------------------------------------------------------------------------------ sources and chat
def test_csv_and_tsv_files(tmp_path):
    (tmp_path / "p.csv").write_text('prompt,chosen,rejected,score_chosen,score_rejected\n'
                                    '"say, hi",hello,go away,1.5,-1\nask,"a ""quoted"" reply",no,2,0\n')
    rows = load_rows(tmp_path / "p.csv", "pair")
    assert rows[0] == {"prompt": "say, hi", "completions": ["hello", "go away"], "rewards": [1.5, -1.0]}
    assert rows[1]["completions"][0] == 'a "quoted" reply'
    (tmp_path / "p.tsv").write_text("prompt\tcompletion\nsay\thello\n")
    assert load_rows(tmp_path / "p.tsv", "sft") == [{"prompt": "say", "completion": "hello"}]
    (tmp_path / "head.csv").write_text("prompt,chosen,rejected\n")
    with pytest.raises(InputError, match="a header but no rows"):
        load_rows(tmp_path / "head.csv", "pair")
    (tmp_path / "bad.csv").write_text("prompt,chosen\nsay,hello\n")
    with pytest.raises(InputError) as e:
        load_rows(tmp_path / "bad.csv", "pair")
    assert e.value.line == 1 and e.value.field == "rejected"


def test_rows_in_memory_and_datasets_are_validated_naming_the_row_index():
    pairs = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "c", "rejected": 3}]
    with pytest.raises(InputError) as e:
        load_rows(pairs, "pair", name="train_data")
    assert str(e.value).startswith("train_data[1]: field 'rejected': must be a string")
    ds = datasets.Dataset.from_list(pairs[:1])
    assert load_rows(ds, "pair") == load_rows(pairs[:1], "pair")
    assert load_rows(datasets.DatasetDict({"train": ds}), "pair") == load_rows(ds, "pair")
    with pytest.raises(InputError, match="no rows"):
        load_rows([], "pair")


def test_chat_rows_without_a_chat_template_say_the_model_has_none():
    row = {"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b"}
    with pytest.raises(InputError) as e:
        load_rows([row], "pair")
    assert "the model has none" in str(e.value) and "no tokeniser was given" not in str(e.value)
    assert "model.init=scratch" in str(e.value)


def test_columns_in_a_yaml_config_and_on_the_command_line(tmp_path):
    from exoalign.config import load_config
    from exoalign.train.config import TrainConfig

    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  columns:\n    prompt: instruction\n    completions: completions[].response\n"
                   "    rewards: completions[].overall_score\n")
    from_yaml = load_config(TrainConfig, cfg).data.columns
    assert from_yaml == load_config(TrainConfig, None, [f"data.columns={ISSUE_COLUMNS}"]).data.columns
    assert from_yaml == parse_columns(ISSUE_COLUMNS)
