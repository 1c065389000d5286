"""The demo's review grammar and oracle: deterministic, rich, balanced, with neutral prompts."""

from __future__ import annotations

import collections
import statistics

import pytest

from exoalign.demo import reviews as R

pytest.importorskip("vaderSentiment")


@pytest.fixture(scope="module")
def sample() -> list[R.Review]:
    return R.generate_reviews(2000, seed=0)


def test_same_seed_same_reviews_other_seed_other_reviews():
    a, b, c = R.generate_reviews(50, seed=3), R.generate_reviews(50, seed=3), R.generate_reviews(50, seed=4)
    assert a == b
    assert sum(x.text == y.text for x, y in zip(a, c)) < 3


def test_rich_vocabulary_and_varied_texts(sample):
    texts = [r.text for r in sample]
    assert len(R.vocabulary(texts)) >= 400  # "hundreds of distinct words"
    assert len(set(texts)) == len(texts)  # no two reviews alike
    lengths = [len(t.split()) for t in texts]
    assert 20 <= statistics.mean(lengths) <= 45 and max(lengths) - min(lengths) >= 25
    # the constructions the grammar promises actually occur
    joined = " ".join(texts).lower()
    for marker in (" but ", " not ", "although", " very ", " out of ten"):
        assert marker in joined, marker


def test_labels_drawn_40_40_20(sample):
    counts = collections.Counter(r.label for r in sample)
    assert abs(counts["positive"] / len(sample) - 0.4) < 0.04
    assert abs(counts["negative"] / len(sample) - 0.4) < 0.04
    assert abs(counts["mixed"] / len(sample) - 0.2) < 0.04


def test_vader_agrees_with_the_grammar_and_the_corpus_is_balanced(sample):
    """VADER reads most positive reviews as positive and most negative as negative, mixed ones in between;
    overall neither sentiment dominates, so pi_sft leaves room to steer toward positive."""
    scores = R.sentiment([r.text for r in sample])
    by = collections.defaultdict(list)
    for r, s in zip(sample, scores):
        by[r.label].append(s)
    frac_pos = {k: sum(s > 0.05 for s in v) / len(v) for k, v in by.items()}
    frac_neg = {k: sum(s < -0.05 for s in v) / len(v) for k, v in by.items()}
    assert frac_pos["positive"] > 0.85
    assert frac_neg["negative"] > 0.7
    means = {k: statistics.mean(v) for k, v in by.items()}
    assert means["negative"] < -0.2 < means["mixed"] - 0.2 < means["positive"] - 0.4
    overall_pos = sum(s > 0.05 for s in scores) / len(scores)
    overall_neg = sum(s < -0.05 for s in scores) / len(scores)
    assert 0.35 < overall_pos < 0.65 and 0.3 < overall_neg < 0.6


def test_prompts_are_neutral_prefixes(sample):
    rows = R.prompt_rows(sample[:500], seed=0)
    for r, row in zip(sample, rows):
        assert row["prompt"] + row["completion"] == r.text
        assert 3 <= len(row["prompt"].split()) <= 6
        assert row["completion"].startswith(" ")
    # names, titles and openings carry no sentiment in VADER's lexicon: the completion decides the reward
    assert all(s == 0.0 for s in R.sentiment([row["prompt"] for row in rows]))


def test_split_prompt_edges():
    assert R.split_prompt("one two three", 2) == ("one two", " three")
    assert R.split_prompt("one two", 5) == ("one two", "")


def test_oracle_scores_completions_like_a_reward_model():
    from exoalign.eval import oracles

    module, name = R.ORACLE.split(":")
    fn = getattr(oracles, name)
    assert module == oracles.__name__
    prompts = ["The Silent Harbor is"] * 3
    completions = [" a wonderful, moving film.", " a dull and awful mess.", " a film."]
    r = fn(prompts, completions)
    assert r[0] > 0.5 and r[1] < -0.5 and r[2] == 0.0
    # the prompts score 0, so scoring the completion equals scoring the whole text
    assert r == R.sentiment([p + c for p, c in zip(prompts, completions)])
