"""``exoalign score`` (oracle / reward model, resumable) and ``exoalign label`` (best-worst, Bradley–Terry)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from exoalign.cli import main as cli
from exoalign.data import load_rows
from exoalign.eval.oracles import vader_logodds, vader_sentiment
from exoalign.rewards import RewardModelJudge, load_oracle
from exoalign.stages import score as score_mod
from exoalign.stages.label import LabelConfig, bradley_terry, make_pairs

ORACLE = '''
def length(prompts, completions):
    return [float(len(c)) for c in completions]

def short(prompts, completions):
    return [1.0]

def nan(prompts, completions):
    return [float("nan")] * len(completions)

NOT_CALLABLE = 3
'''




@pytest.fixture()
def oracle_dir(tmp_path, monkeypatch):
    (tmp_path / "my_oracle.py").write_text(ORACLE, encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # `module:function` specs are also looked up in the working directory
    return tmp_path


def _groups(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


GROUPS = [
    {"prompt": "the movie", "completions": ["was fine", "was a great delight", "ok"]},
    {"prompt": "a film", "completions": ["bad", "truly terrible"], "id": 7},
    {"prompt": "what a", "completions": ["waste of time", "surprise", "good time!", "x y"]},
]


def test_oracle_scores_every_completion(oracle_dir):
    src = _groups(oracle_dir / "g.jsonl", GROUPS)
    for n, spec in enumerate(("my_oracle:length", "my_oracle.py:length")):
        out = oracle_dir / f"s{n}.jsonl"
        assert cli(["score", f"input={src}", f"output={out}", "--oracle", spec, "rows_per_write=2"]) == 0
        rows = load_rows(out, "group", require_rewards=True)
        assert [r["rewards"] for r in rows] == [[float(len(c)) for c in g["completions"]] for g in GROUPS]
        assert rows[1]["id"] == 7  # extra fields survive


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("my_oracle", "cannot read oracle spec"),
        ("no_such_module:f", "cannot import"),
        ("my_oracle:missing", "has no attribute"),
        ("my_oracle:NOT_CALLABLE", "not callable"),
        ("my_oracle:short", "returned 1 rewards for"),
        ("my_oracle:nan", "non-finite"),
        ("missing_file.py:f", "not found"),
    ],
)
def test_bad_oracle_exits_2_and_writes_nothing(oracle_dir, capsys, spec, needle):
    src = _groups(oracle_dir / "g.jsonl", GROUPS)
    out = oracle_dir / "s.jsonl"
    assert cli(["score", f"input={src}", f"output={out}", f"oracle={spec}"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists() and not (oracle_dir / "s.jsonl.meta.json").exists()


@pytest.mark.parametrize(
    "rows, extra, needle",
    [
        ([{"prompt": "p", "completions": ["only one"]}], [], "at least 2"),
        ([{"prompt": "p", "completions": ["a", ""]}], [], "empty"),
        ([{"prompt": "p", "completions": ["a", "b"]}], ["reward_model=x"], "exactly one"),
    ],
)
def test_bad_groups_exit_2(oracle_dir, capsys, rows, extra, needle):
    src = _groups(oracle_dir / "g.jsonl", rows)
    assert cli(["score", f"input={src}", f"output={oracle_dir / 's.jsonl'}", "oracle=my_oracle:length", *extra]) == 2
    assert needle in capsys.readouterr().err
    assert not (oracle_dir / "s.jsonl").exists()


def test_score_resumes_after_interruption(oracle_dir, monkeypatch):
    rows = [{"prompt": f"p{i}", "completions": [f"c{i}", "d" * i + "e"]} for i in range(7)]
    src = _groups(oracle_dir / "g.jsonl", rows)
    ref, out = oracle_dir / "ref.jsonl", oracle_dir / "out.jsonl"
    args = ["oracle=my_oracle:length", "rows_per_write=3"]
    assert cli(["score", f"input={src}", f"output={ref}", *args]) == 0
    real, calls = score_mod.append_rows, []

    def die_after_first(path, chunk):
        calls.append(1)
        real(path, chunk)
        raise KeyboardInterrupt

    monkeypatch.setattr(score_mod, "append_rows", die_after_first)
    assert cli(["score", f"input={src}", f"output={out}", *args]) == 130
    monkeypatch.setattr(score_mod, "append_rows", real)
    assert len(out.read_text().splitlines()) == 3
    with open(out, "a") as f:
        f.write('{"prompt": "p3", "compl')  # torn line
    assert cli(["score", f"input={src}", f"output={out}", *args]) == 0
    assert out.read_bytes() == ref.read_bytes()


# --------------------------------------------------------------------------------- reward models
def _classifier_dir(tmp_path, tiny_tokenizer, num_labels, id2label=None):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    cfg = GPT2Config(vocab_size=len(tiny_tokenizer), n_layer=1, n_head=2, n_embd=32, n_positions=128,
                     num_labels=num_labels, pad_token_id=tiny_tokenizer.pad_token_id)
    if id2label:
        cfg.id2label, cfg.label2id = id2label, {v: k for k, v in id2label.items()}
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(cfg)
    path = tmp_path / f"rm{num_labels}"
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path, model.eval()


def _single(model, tok, text):
    ids = tok(text, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits[0].float()


def test_reward_model_scalar_and_log_odds(tmp_path, tiny_tokenizer):
    prompts = ["the movie", "a film", "what a"]
    comps = [" was great", " was terrible and the plot was boring", " waste"]
    path1, m1 = _classifier_dir(tmp_path, tiny_tokenizer, 1)
    # Text layout: batched (right-padded) scores equal one-at-a-time unpadded forwards of prompt + completion.
    judge = RewardModelJudge(str(path1), batch_size=2, device="cpu", layout="text")
    want = [float(_single(m1, tiny_tokenizer, p + c)[0]) for p, c in zip(prompts, comps)]
    assert judge(prompts, comps) == pytest.approx(want, abs=1e-5)
    # A one-output decoder model is read as `exoalign rm train` trains it: prompt ids + completion ids + EOS.
    judge = RewardModelJudge(str(path1), batch_size=2, device="cpu")
    assert judge.layout == "exoalign"
    want = []
    for p, c in zip(prompts, comps):
        ids = tiny_tokenizer(p)["input_ids"] + tiny_tokenizer(c, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            want.append(float(m1(torch.tensor([ids + [tiny_tokenizer.eos_token_id]])).logits[0, 0]))
    assert judge(prompts, comps) == pytest.approx(want, abs=1e-5)

    path2, m2 = _classifier_dir(tmp_path, tiny_tokenizer, 2, {0: "NEGATIVE", 1: "POSITIVE"})
    judge = RewardModelJudge(str(path2), batch_size=3, device="cpu")
    assert judge.layout == "text"  # a two-label classifier reads plain text
    logits = [_single(m2, tiny_tokenizer, p + c) for p, c in zip(prompts, comps)]
    assert judge(prompts, comps) == pytest.approx([float(lg[1] - lg[0]) for lg in logits], abs=1e-5)
    # log-odds = log p(pos) − log p(neg)
    lp = torch.log_softmax(logits[0], -1)
    assert judge(prompts[:1], comps[:1])[0] == pytest.approx(float(lp[1] - lp[0]), abs=1e-5)
    flipped = RewardModelJudge(str(path2), device="cpu", positive_label="NEGATIVE")
    assert flipped(prompts, comps) == pytest.approx([-v for v in judge(prompts, comps)], abs=1e-6)


def test_score_with_reward_model_cli(tmp_path, tiny_tokenizer):
    path, model = _classifier_dir(tmp_path, tiny_tokenizer, 1)
    src = _groups(tmp_path / "g.jsonl", GROUPS)
    out = tmp_path / "s.jsonl"
    assert cli(["score", f"input={src}", f"output={out}", f"reward_model={path}", "device=cpu", "judge_batch_size=4"]) == 0
    rows = load_rows(out, "group", require_rewards=True)
    ids = tiny_tokenizer(GROUPS[0]["prompt"])["input_ids"]
    ids += tiny_tokenizer(GROUPS[0]["completions"][1], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        r0 = float(model(torch.tensor([ids + [tiny_tokenizer.eos_token_id]])).logits[0, 0])
    assert rows[0]["rewards"][1] == pytest.approx(r0, abs=1e-5)
    assert cli(["score", f"input={src}", f"output={tmp_path / 'x.jsonl'}", f"reward_model={tmp_path}/nope"]) == 2


def test_vader_oracles():
    pos, neg, flat = vader_sentiment(["", "", ""], ["a wonderful, great film", "awful and boring", "a film"])
    assert pos > 0.5 and neg < -0.5 and flat == 0.0
    lo = vader_logodds(["", ""], ["a wonderful, great film", "awful and boring"])
    assert lo[0] == pytest.approx(math.log((1 + pos) / (1 - pos))) and lo[1] < 0
    assert load_oracle("exoalign.eval.oracles:vader_sentiment") is vader_sentiment


# ---------------------------------------------------------------------------------------- label
SCORED = [
    {"prompt": "a", "completions": ["x", "y", "z"], "rewards": [0.5, 2.0, -1.0]},
    {"prompt": "b", "completions": ["u", "v"], "rewards": [1.0, 1.0]},  # a tie: no preference
    {"prompt": "c", "completions": ["p", "q", "r"], "rewards": [3.0, 3.0, 0.5], "id": 3},
]


def test_label_best_worst(tmp_path, capsys):
    src, out = _groups(tmp_path / "s.jsonl", SCORED), tmp_path / "pairs.jsonl"
    assert cli(["label", f"input={src}", f"output={out}"]) == 0
    assert "1 skipped" in capsys.readouterr().err
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(p["prompt"], p["chosen"], p["rejected"], p["rewards"]) for p in pairs] == [
        ("a", "y", "z", [2.0, -1.0]),
        ("c", "p", "r", [3.0, 0.5]),  # first of equal maxima
    ]
    assert pairs[1]["id"] == 3
    assert len(load_rows(out, "pair")) == 2  # valid pair rows
    assert cli(["label", f"input={src}", f"output={out}", "min_margin=2.6"]) == 0
    assert len(out.read_text().splitlines()) == 1


def test_label_bad_input(tmp_path, capsys):
    tied = _groups(tmp_path / "t.jsonl", [SCORED[1]])
    assert cli(["label", f"input={tied}", f"output={tmp_path / 'o.jsonl'}"]) == 2
    assert "tied" in capsys.readouterr().err
    unscored = _groups(tmp_path / "u.jsonl", [{"prompt": "p", "completions": ["a", "b"]}])
    assert cli(["label", f"input={unscored}", f"output={tmp_path / 'o.jsonl'}"]) == 2
    assert "rewards" in capsys.readouterr().err
    assert cli(["label", f"input={tied}", f"output={tmp_path / 'o.jsonl'}", "method=elo"]) == 2
    assert not (tmp_path / "o.jsonl").exists()


def test_bradley_terry_labels_follow_the_model():
    """P(chosen = the r=1 completion) must be σ((1 − 0)/scale) for groups with rewards [0, 1]."""
    rows = [{"prompt": f"p{i}", "completions": ["low", "high"], "rewards": [0.0, 1.0]} for i in range(3000)]
    for scale in (1.0, 2.0):
        pairs, skipped = make_pairs(rows, LabelConfig(method="bradley_terry", bt_scale=scale, seed=1))
        assert skipped == 0 and len(pairs) == 3000
        frac = sum(p["chosen"] == "high" for p in pairs) / 3000
        p = 1 / (1 + math.exp(-1 / scale))
        assert abs(frac - p) < 4 * math.sqrt(p * (1 - p) / 3000), (scale, frac, p)
    # Seeded per row: the same row index and seed give the same pair, whatever the other rows are.
    row = {"prompt": "p", "completions": list("abcde"), "rewards": [0.1, 0.5, -0.3, 2.0, 1.0]}
    a = bradley_terry(row, 17, pairs=3, seed=5)
    assert a == bradley_terry(row, 17, pairs=3, seed=5)
    assert len({frozenset((p["chosen"], p["rejected"])) for p in a}) == 3  # distinct pairs
    assert len(bradley_terry(row, 0, pairs=99)) == 10  # at most K(K-1)/2
