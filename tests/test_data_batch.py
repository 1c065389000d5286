"""tokenize_rows (truncation policy, stats, fingerprint), GroupCollator (exact layout; log-probs equal unpadded
ones) and select_k."""

from __future__ import annotations

import pytest
import torch
from numerics import assert_close_scaled, rel_tol

from exoalign.data import GroupCollator, TokenizedData, select_k, tokenize_rows
from exoalign.errors import InputError
from exoalign.logprobs import sequence_logps


# ------------------------------------------------------------------------------------------ collation
def test_collator_exact_layout():
    """Two groups, K = 2, P = 3, C = 3 (T = 6); group 1 has one completion, so slot (1, 1) is prompt-only."""
    feats = [
        {"index": 4, "prompt_ids": [5, 6], "completion_ids": [[7, 8, 9], [10]], "rewards": [1.0, 2.0]},
        {"index": 9, "prompt_ids": [11, 12, 13], "completion_ids": [[14, 15]], "rewards": [0.5]},
    ]
    batch = GroupCollator(pad_token_id=0)(feats)
    X = -100
    assert batch["input_ids"].tolist() == [
        [0, 5, 6, 7, 8, 9],
        [0, 5, 6, 10, 0, 0],
        [11, 12, 13, 14, 15, 0],
        [11, 12, 13, 0, 0, 0],
    ]
    assert batch["attention_mask"].tolist() == [
        [0, 1, 1, 1, 1, 1],
        [0, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 0, 0, 0],
    ]
    assert batch["labels"].tolist() == [
        [X, X, X, 7, 8, 9],
        [X, X, X, 10, X, X],
        [X, X, X, 14, 15, X],
        [X, X, X, X, X, X],
    ]
    assert batch["group_mask"].tolist() == [[True, True], [True, False]]
    assert batch["group_mask"].dtype == torch.bool
    assert batch["lengths"].tolist() == [[3, 1], [2, 0]]
    assert batch["index"].tolist() == [4, 9]
    assert batch["rewards"].tolist() == [[1.0, 2.0], [0.5, 0.0]]
    assert "ref_logps" not in batch


def test_collator_rewards_only_when_all_rows_have_them_and_ref_logps():
    feats = [
        {"index": 0, "prompt_ids": [1], "completion_ids": [[2], [3]], "rewards": None, "ref_logps": [-1.5, -2.0]},
        {"index": 1, "prompt_ids": [1], "completion_ids": [[2], [3], [4]], "rewards": [1.0, 2.0, 3.0],
         "ref_logps": [-0.5, -0.25, -3.0]},
    ]
    batch = GroupCollator(pad_token_id=0)(feats)
    assert "rewards" not in batch
    assert batch["ref_logps"].tolist() == [[-1.5, -2.0, 0.0], [-0.5, -0.25, -3.0]]
    assert batch["input_ids"].shape == (6, 2)
    with pytest.raises(ValueError, match="ref_logps"):
        GroupCollator(0)([feats[0], {k: v for k, v in feats[1].items() if k != "ref_logps"}])


def test_collated_logps_equal_unpadded_logps(tiny_model, tiny_tokenizer):
    rows = [
        {"prompt": "the movie was", "completions": ["great and the acting was wonderful", "terrible", "a charming cast"]},
        {"prompt": "i hated the ending and the dialogue", "completions": ["was weak", "was a delightful story"]},
        {"prompt": "what", "completions": ["a fantastic surprise", "a waste of time, truly a bad film"]},
    ]
    data = tokenize_rows(rows, tiny_tokenizer, max_length=64, max_prompt_length=32)
    batch = GroupCollator(tiny_tokenizer.pad_token_id)(list(data))
    B, K = batch["group_mask"].shape
    assert (B, K) == (3, 3) and batch["group_mask"].sum() == 7
    tiny_model.eval()
    with torch.no_grad():
        logps, lengths = sequence_logps(tiny_model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        logps, lengths = logps.view(B, K), lengths.view(B, K)  # (B, K)
        assert torch.equal(lengths, batch["lengths"])
        for b, feat in enumerate(data):
            for k in range(K):
                if k >= len(feat["completion_ids"]):
                    assert logps[b, k] == 0 and lengths[b, k] == 0
                    continue
                prompt, comp = feat["prompt_ids"], feat["completion_ids"][k]
                ids = torch.tensor([prompt + comp])  # (1, n): unpadded
                logits = tiny_model(ids).logits[0].float().log_softmax(-1)  # (n, V)
                # Token j of the completion sits at column len(prompt) + j, predicted by the column before.
                ref = sum(logits[len(prompt) + j - 1, t] for j, t in enumerate(comp))
                # fp32 sums of ~100 nats: the no-grad path's chunked head and the padded batch round differently
                assert_close_scaled(logps[b, k], ref, rel_tol(torch.float32, tiny_model.config.vocab_size),
                                    what=f"row {b} completion {k}")


# ------------------------------------------------------------------------------------------ tokenisation
def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_tokenize_truncation_policy_and_counts(tiny_tokenizer):
    tok = tiny_tokenizer
    eos = tok.eos_token_id
    long_prompt = "the film was terrible and the plot was boring"
    short_prompt = "the movie"
    p_long, p_short = _ids(tok, long_prompt), _ids(tok, short_prompt)
    assert len(p_long) > 6 and len(p_short) <= 6
    max_prompt, max_len = 6, 12
    fits = "great"  # short: + EOS fits in any budget here
    long_comp = "a delightful story with a charming cast and the music"
    c_fits, c_long = _ids(tok, fits), _ids(tok, long_comp)
    budget_long, budget_short = max_len - max_prompt, max_len - len(p_short)
    assert len(c_fits) + 1 <= budget_long and len(c_long) + 1 > budget_short
    # A completion of exactly budget - 1 tokens keeps its EOS; one of exactly budget tokens loses it.
    # Upper-case letters never occur in the training corpus, so each is one token (no merges).
    exact, over = "Q" * (budget_long - 1), "Q" * budget_long
    assert (len(_ids(tok, exact)), len(_ids(tok, over))) == (budget_long - 1, budget_long)

    rows = [
        {"prompt": long_prompt, "completions": [fits, long_comp], "rewards": [1.0, 0.0]},
        {"prompt": short_prompt, "completion": long_comp},  # an sft row: a group of one
        {"prompt": long_prompt, "completions": [exact, over], "rewards": None},
    ]
    data = tokenize_rows(rows, tok, max_length=max_len, max_prompt_length=max_prompt)
    f0, f1, f2 = data
    assert f0["prompt_ids"] == p_long[-max_prompt:]  # the end of the prompt is kept
    assert f0["completion_ids"] == [c_fits + [eos], c_long[:budget_long]]
    assert f1["prompt_ids"] == p_short and f1["completion_ids"] == [c_long[:budget_short]]
    assert f2["completion_ids"][0] == _ids(tok, exact) + [eos]
    assert f2["completion_ids"][1] == _ids(tok, over)
    assert all(len(f["prompt_ids"]) + len(c) <= max_len for f in data for c in f["completion_ids"])
    assert data.stats == {"rows": 3, "truncated_prompts": 2, "truncated_completions": 3}
    assert f0["rewards"] == [1.0, 0.0] and f1["rewards"] is None and [f["index"] for f in data] == [0, 1, 2]


def test_fingerprint_tracks_token_ids_not_rewards(tiny_tokenizer, corpus):
    from exoalign.models import train_bpe_tokenizer

    rows = [{"prompt": "the movie was", "completions": ["great", "boring"], "rewards": [1.0, 0.0]}]
    fp = tokenize_rows(rows, tiny_tokenizer, max_length=32, max_prompt_length=16).fingerprint
    assert fp == tokenize_rows([dict(r) for r in rows], tiny_tokenizer, max_length=32, max_prompt_length=16).fingerprint
    rescored = [dict(rows[0], rewards=[0.0, 5.0])]
    assert tokenize_rows(rescored, tiny_tokenizer, max_length=32, max_prompt_length=16).fingerprint == fp
    swapped = [dict(rows[0], completions=["boring", "great"])]
    assert tokenize_rows(swapped, tiny_tokenizer, max_length=32, max_prompt_length=16).fingerprint != fp
    assert tokenize_rows(rows, tiny_tokenizer, max_length=4, max_prompt_length=2).fingerprint != fp
    other = train_bpe_tokenizer(corpus, vocab_size=280, model_max_length=256)
    assert tokenize_rows(rows, other, max_length=32, max_prompt_length=16).fingerprint != fp


def test_with_ref_logps_and_bad_lengths(tiny_tokenizer):
    rows = [{"prompt": "the movie", "completions": ["great", "boring"]}]
    data = tokenize_rows(rows, tiny_tokenizer, max_length=16, max_prompt_length=8)
    assert isinstance(data, TokenizedData) and len(data) == 1
    assert data.with_ref_logps([[-1.0, -2.0]])[0]["ref_logps"] == [-1.0, -2.0]
    assert "ref_logps" not in data[0]
    with pytest.raises(ValueError):
        data.with_ref_logps([[-1.0]])
    for max_length, max_prompt in [(8, 8), (8, 0), (0, 0)]:
        with pytest.raises(InputError, match="max_prompt_length"):
            tokenize_rows(rows, tiny_tokenizer, max_length=max_length, max_prompt_length=max_prompt)


# ------------------------------------------------------------------------------------------ select_k
ROW = {"prompt": "p", "completions": ["c0", "c1", "c2", "c3", "c4"], "rewards": [0.1, 0.9, 0.5, -1.0, 0.7], "id": 3}


@pytest.mark.parametrize("k,expected", [
    (1, [1]),              # the best
    (2, [1, 3]),           # best, worst
    (3, [1, 4, 3]),        # top 2 (0.9, 0.7), bottom 1 (-1.0)
    (4, [1, 4, 0, 3]),     # top 2, bottom 2 (0.1, -1.0), best first throughout
    (5, [0, 1, 2, 3, 4]),  # all: unchanged
    (9, [0, 1, 2, 3, 4]),
])
def test_select_best_worst(k, expected):
    (out,) = select_k([ROW], k, "best_worst")
    assert out["completions"] == [f"c{i}" for i in expected]
    assert out["rewards"] == [ROW["rewards"][i] for i in expected]
    assert out["id"] == 3 and ROW["completions"] == ["c0", "c1", "c2", "c3", "c4"]  # input untouched


def test_select_best_worst_ties_keep_original_order():
    row = {"prompt": "p", "completions": ["a", "b", "c", "d"], "rewards": [1.0, 1.0, 0.0, 0.0]}
    assert select_k([row], 2)[0]["completions"] == ["a", "d"]


def test_select_first_and_random():
    assert select_k([ROW], 2, "first")[0]["completions"] == ["c0", "c1"]
    rows = [dict(ROW, id=i) for i in range(20)]
    a = select_k(rows, 3, "random", seed=1)
    assert a == select_k(rows, 3, "random", seed=1)  # reproducible
    assert a != select_k(rows, 3, "random", seed=2)
    assert len({tuple(r["completions"]) for r in a}) > 1  # rows draw independently
    for r in a:
        idx = [int(c[1]) for c in r["completions"]]
        assert idx == sorted(idx) and len(set(idx)) == 3  # original order, no repeats
        assert r["rewards"] == [ROW["rewards"][i] for i in idx]
    # A row's choice depends on its seed and index only, not on the rows after it.
    assert select_k(rows[:5], 3, "random", seed=1) == a[:5]


def test_select_errors():
    no_rewards = {"prompt": "p", "completions": ["a", "b", "c"], "rewards": None}
    with pytest.raises(InputError, match="no rewards") as e:
        select_k([ROW, no_rewards], 2, "best_worst")
    assert e.value.field == "rewards" and "row 2" in e.value.message
    assert select_k([no_rewards], 2, "first")[0] == {"prompt": "p", "completions": ["a", "b"], "rewards": None}
    for k in (0, -1, 2.0, True):
        with pytest.raises(InputError):
            select_k([ROW], k)
    with pytest.raises(InputError, match="best_worst"):
        select_k([ROW], 2, "best")


def test_prompt_special_tokens_added_once(tiny_tokenizer):
    """A tokeniser that prepends BOS (like Llama's) gets it on plain prompts, not twice on rendered chats."""
    import copy

    from tokenizers.processors import TemplateProcessing

    tok = copy.deepcopy(tiny_tokenizer)
    bos = tok.bos_token
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tok.bos_token_id)])
    plain = tok("the movie", add_special_tokens=False)["input_ids"]
    rows = [{"prompt": "the movie", "completion": "great"}, {"prompt": bos + "the movie", "completion": "great"}]
    data = tokenize_rows(rows, tok, max_length=32, max_prompt_length=16)
    assert data[0]["prompt_ids"] == [tok.bos_token_id] + plain
    assert data[1]["prompt_ids"] == [tok.bos_token_id] + plain
    assert data[0]["completion_ids"] == [tok("great", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
