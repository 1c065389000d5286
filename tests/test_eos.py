"""Issue 12 item 14: sampled completions cut at ``max_new_tokens`` are not trained as if they had ended.

``exoalign sample`` records per completion whether it ``finished`` (emitted EOS) and the sampled
``completion_ids``; ``tokenize_rows`` appends EOS only to finished completions and scores the stored ids, so
the log-probs the trainer computes are of exactly the tokens sampled. Rows without the fields (hand-written
data) keep EOS on every completion.
"""

from __future__ import annotations

import json

import pytest
import torch
from numerics import assert_close_scaled, rel_tol

from exoalign.cli import main as cli
from exoalign.data import GroupCollator, encode_prompts, load_rows, select_k, tokenize_rows
from exoalign.errors import InputError
from exoalign.logprobs import sequence_logps
from exoalign.models import build_model, tiny_config
from exoalign.stages.label import best_worst


@pytest.fixture(scope="module")
def eager_eos_model_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny GPT-2 whose EOS logit is scaled up ×40 (tied embeddings): its sign decides, so about half the
    steps emit EOS and a 4-token budget leaves both finished and cut-off completions."""
    path = tmp_path_factory.mktemp("eager-eos")
    model = build_model(tiny_config(len(tiny_tokenizer)), seed=0, tokenizer=tiny_tokenizer)
    with torch.no_grad():
        model.transformer.wte.weight[tiny_tokenizer.eos_token_id] *= 40.0
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, eager_eos_model_dir, corpus):
    root = tmp_path_factory.mktemp("sampled")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": " ".join(c.split()[:3]) + f" {i}"}) + "\n"
                               for i, c in enumerate(corpus[:8])), encoding="utf-8")
    out = root / "groups.jsonl"
    assert cli(["sample", f"model={eager_eos_model_dir}", f"prompts={prompts}", f"output={out}", "k=2",
                "max_new_tokens=4", "temperature=1.0", "device=cpu", "seed=3"]) == 0
    return out


def test_sample_rows_record_finished_and_ids(sampled, tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    raw = [json.loads(line) for line in sampled.read_text(encoding="utf-8").splitlines()]
    flags = [f for r in raw for f in r["finished"]]
    assert any(flags) and not all(flags)  # both kinds occur (fixed seed: deterministic)
    for r in raw:
        assert len(r["finished"]) == len(r["completions"]) == len(r["completion_ids"]) == 2
        for done, ids, text in zip(r["finished"], r["completion_ids"], r["completions"]):
            assert done == (ids[-1] == eos) and ids.count(eos) == int(done)
            assert len(ids) <= 4 and (done or len(ids) == 4)
            assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == text
    rows = load_rows(sampled, "preference")  # the data format accepts the new fields
    assert rows[0]["finished"] == raw[0]["finished"] and rows[0]["completion_ids"] == raw[0]["completion_ids"]


def test_training_features_are_exactly_the_sampled_tokens(sampled, tiny_tokenizer, eager_eos_model_dir):
    raw = [json.loads(line) for line in sampled.read_text(encoding="utf-8").splitlines()]
    rows = load_rows(sampled, "preference")
    data = tokenize_rows(rows, tiny_tokenizer, max_length=64, max_prompt_length=32)
    n_cut = sum(not f for r in raw for f in r["finished"])
    assert data.stats["unfinished_completions"] == n_cut > 0
    assert data.stats["sampled_ids"] == 2 * len(raw) and data.stats["stale_ids"] == 0
    prompt_ids = encode_prompts(tiny_tokenizer, [r["prompt"] for r in raw], 512)
    for feat, r, p in zip(data, raw, prompt_ids):
        assert feat["prompt_ids"] == p
        assert feat["completion_ids"] == r["completion_ids"]  # no EOS added to a cut-off completion
    # Why the ids are stored: re-tokenising the decoded text segments a random model's samples differently.
    eos = tiny_tokenizer.eos_token_id
    retokenised = [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for r in raw for t in r["completions"]]
    sampled_bodies = [[t for t in ids if t != eos] for r in raw for ids in r["completion_ids"]]
    assert sum(a != b for a, b in zip(retokenised, sampled_bodies)) > 0
    # Log-probs of the training batch = log-probs of the sampled sequences, token by token.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(eager_eos_model_dir).eval()
    batch = GroupCollator(tiny_tokenizer.pad_token_id)(list(data))
    with torch.no_grad():
        logps, _ = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        for n, (p, r) in enumerate(zip(prompt_ids, raw)):
            for k, ids in enumerate(r["completion_ids"]):
                logits = model(torch.tensor([p + ids])).logits[0].log_softmax(-1)  # (len, V)
                want = sum(logits[len(p) + j - 1, t] for j, t in enumerate(ids))
                # the padded batch vs the row alone: fp32 rounding over the vocabulary, relative to the value
                assert_close_scaled(logps[n * 2 + k], want, rel_tol(torch.float32, model.config.vocab_size),
                                    what=f"prompt {n} completion {k}")


def test_train_on_sampled_rows_reports_the_cut_completions(sampled, tmp_path, eager_eos_model_dir):
    raw = [json.loads(line) for line in sampled.read_text(encoding="utf-8").splitlines()]
    out = tmp_path / "run"
    assert cli(["train", f"model.name_or_path={eager_eos_model_dir}", f"data.train_file={sampled}",
                "train.cpu=true", "train.max_steps=1", "train.batch_size=4", f"train.output_dir={out}",
                f"train.ref_cache_dir={tmp_path / 'cache'}"]) == 0
    stats = json.loads((out / "run_info.json").read_text())["train_stats"]
    assert stats["unfinished_completions"] == sum(not f for r in raw for f in r["finished"])
    assert stats["sampled_ids"] == 2 * len(raw)


def _rows(text: str, tmp_path, kind: str = "preference") -> list[dict]:
    path = tmp_path / "rows.jsonl"
    path.write_text(text, encoding="utf-8")
    return load_rows(path, kind)


def test_eos_follows_the_finished_flags_and_defaults_to_always(tmp_path, tiny_tokenizer):
    tok, eos = tiny_tokenizer, tiny_tokenizer.eos_token_id
    rows = _rows('{"prompt": "the movie", "completions": ["was great", "was bad"]}\n'
                 '{"prompt": "the film", "completions": ["was great", "was bad"], "finished": [true, false]}\n', tmp_path)
    data = tokenize_rows(rows, tok, max_length=64, max_prompt_length=32)
    great, bad = (tok(t, add_special_tokens=False)["input_ids"] for t in ("was great", "was bad"))
    assert data[0]["completion_ids"] == [great + [eos], bad + [eos]]  # hand-written: EOS on every completion
    assert data[1]["completion_ids"] == [great + [eos], bad]
    assert data.stats["unfinished_completions"] == 1


def test_stale_ids_fall_back_to_the_text(tmp_path, tiny_tokenizer):
    """Ids that no longer decode to the text (the text was edited after sampling) are not used."""
    tok, eos = tiny_tokenizer, tiny_tokenizer.eos_token_id
    ids = tok("was great", add_special_tokens=False)["input_ids"]
    row = {"prompt": "the movie", "completions": ["was wonderful", "was great"], "finished": [True, False],
           "completion_ids": [ids + [eos], ids]}
    data = tokenize_rows(_rows(json.dumps(row) + "\n", tmp_path), tok, max_length=64, max_prompt_length=32)
    assert data[0]["completion_ids"] == [tok("was wonderful", add_special_tokens=False)["input_ids"] + [eos], ids]
    assert (data.stats["sampled_ids"], data.stats["stale_ids"]) == (1, 1)


def test_per_completion_fields_follow_selection_and_labelling(tmp_path):
    row = {"prompt": "p", "completions": ["a", "b", "c"], "rewards": [0.0, 2.0, 1.0], "finished": [True, False, True],
           "completion_ids": [[1], [2], [3]]}
    (kept,) = select_k(_rows(json.dumps(row) + "\n", tmp_path), 2, "best_worst")
    assert kept["completions"] == ["b", "a"] and kept["finished"] == [False, True] and kept["completion_ids"] == [[2], [1]]
    (pair,) = best_worst(row)
    assert (pair["chosen"], pair["rejected"], pair["finished"], pair["completion_ids"]) == ("b", "a", [False, True],
                                                                                          [[2], [1]])
    (reloaded,) = _rows(json.dumps(pair) + "\n", tmp_path)  # a labelled pair row loads with its flags
    assert reloaded["finished"] == [False, True]


@pytest.mark.parametrize(("extra", "needle"), [
    ('"finished": [true]', "field 'finished': has 1 values"),
    ('"finished": ["yes", "no"]', "field 'finished': must be a list of true/false"),
    ('"completion_ids": [[1, 2]]', "field 'completion_ids': has 1 lists"),
    ('"completion_ids": [[1], [-3]]', "field 'completion_ids': must be a list of non-empty lists"),
])
def test_bad_sampled_fields_are_refused_with_file_and_line(tmp_path, extra, needle):
    with pytest.raises(InputError, match=needle) as err:
        _rows('{"prompt": "p", "completions": ["a", "b"]}\n{"prompt": "p", "completions": ["a", "b"], ' + extra + "}\n",
              tmp_path)
    assert err.value.line == 2
