"""``exoalign eval``: KL estimators (0 at π_θ = π_sft, exact on an enumerable model), win rate, resume, bad input."""

from __future__ import annotations

import itertools
import json
import math
import shutil

import numpy as np
import pytest
import torch
from numerics import assert_close_scaled, rel_tol

from exoalign.cli import main as cli
from exoalign.eval import evaluate as eval_mod
from exoalign.eval.evaluate import completion_logps, expand_checkpoints, sample_all
from exoalign.eval.kl import k3_terms, kl_k1, kl_k3
from exoalign.eval.winrate import mean_ci, outcomes, win_rate
from exoalign.sampling import HFSampler, SamplingSettings

EOS = 4  # the tiny enumerable models: vocabulary {0, 1, 2, 3, EOS}




class IdTokenizer:
    """Just what the sampler needs from a tokeniser, for a model whose vocabulary is five bare ids."""

    eos_token_id = EOS
    pad_token_id = EOS

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids if not (skip_special_tokens and i == EOS))


def _enumerable_model(seed):
    from exoalign.models import build_model, tiny_config

    cfg = tiny_config(5, n_positions=16, n_layer=1, n_embd=16, initializer_range=0.15)
    cfg.eos_token_id = cfg.bos_token_id = cfg.pad_token_id = EOS
    return build_model(cfg, seed=seed).eval()


def _all_completions(max_new):
    """Every completion of at most ``max_new`` tokens: EOS-terminated ones and the cut-off ones of full length."""
    out = []
    for n in range(max_new):
        for body in itertools.product(range(EOS), repeat=n):
            out.append(list(body) + [EOS])
    out.extend(list(body) for body in itertools.product(range(EOS), repeat=max_new))
    return out


@torch.no_grad()
def _naive_logp(model, prompt, completion, T):
    """log π(y|x) from one full forward and a plain log_softmax (no batching, no padding)."""
    ids = torch.tensor([prompt + completion])
    logp = torch.log_softmax(model(ids).logits[0].double() / T, -1)  # (L, V)
    return float(sum(logp[len(prompt) - 1 + t, tok] for t, tok in enumerate(completion)))


# ---------------------------------------------------------------------------------- estimators
def test_estimators_golden_values():
    """ℓ = [ln 2, −ln 2]: k1 = 0; k3 = ((½ − 1) + ln 2 + (2 − 1) − ln 2) / 2 = 0.25 (ρ = e^{−ℓ} = [½, 2])."""
    lp_pi = np.array([[math.log(2), -math.log(2)]])
    lp_ref = np.zeros((1, 2))
    assert kl_k1(lp_pi, lp_ref).mean == pytest.approx(0.0, abs=1e-12)
    assert kl_k3(lp_pi, lp_ref).mean == pytest.approx(0.25, abs=1e-12)
    terms = k3_terms(np.random.default_rng(0).normal(size=1000) * 3, np.zeros(1000))
    assert np.all(terms >= 0)
    same = np.random.default_rng(1).normal(size=(5, 3)) * 10
    assert kl_k1(same, same).mean == 0 and kl_k3(same, same).mean == 0
    # Per-prompt averaging: the standard error is over prompts.
    est = kl_k1(np.array([[1.0, 3.0], [0.0, 2.0]]), np.zeros((2, 2)))
    assert (est.mean, est.se) == pytest.approx((1.5, 0.5))


def test_kl_estimators_match_exact_kl_on_an_enumerable_model():
    """Vocabulary of 5, at most 3 new tokens: 85 possible completions, so KL(π_θ‖π_sft) is a finite sum.

    The estimators run on the library's own sampler (Gumbel-max, per-sequence seeds) and batched log-probs
    (``completion_logps`` → ``sequence_logps``) at temperature 0.8; the exact value uses a naive log_softmax.
    """
    T, max_new, N = 0.8, 3, 3000
    policy, ref = _enumerable_model(1), _enumerable_model(2)
    prompt = [0, 2, 1]
    seqs = _all_completions(max_new)
    assert len(seqs) == 1 + 4 + 16 + 64
    lp_pi = np.array([_naive_logp(policy, prompt, s, T) for s in seqs])
    lp_ref = np.array([_naive_logp(ref, prompt, s, T) for s in seqs])
    assert np.exp(lp_pi).sum() == pytest.approx(1.0, abs=1e-9) and np.exp(lp_ref).sum() == pytest.approx(1.0, abs=1e-9)
    exact = float((np.exp(lp_pi) * (lp_pi - lp_ref)).sum())
    assert 0.5 < exact < 2  # ≈ 1.05 nats: far from 0, and small enough for k3's heavy tail to stay tame

    settings = SamplingSettings(temperature=T, max_new_tokens=max_new, seed=0)
    groups = sample_all(HFSampler(policy, IdTokenizer(), settings), [prompt], N, 1, "test")
    # The fast batched log-probs equal the naive ones on the sampled sequences.
    kw = {"temperature": T, "batch_size": 512, "pad_id": EOS}
    a = completion_logps(policy, [prompt], groups, **kw)  # (1, N)
    b = completion_logps(ref, [prompt], groups, **kw)
    index = {tuple(s): i for i, s in enumerate(seqs)}
    rows = [index[tuple(c.ids)] for c in groups[0]]
    # batched fp32 forward vs the naive per-sequence one: rounding over the 5-token vocabulary and ~max_new steps
    tol = rel_tol(torch.float32, 5 * max_new)
    assert_close_scaled(torch.tensor(a[0]), torch.tensor(lp_pi[rows]), tol, what="policy")
    assert_close_scaled(torch.tensor(b[0]), torch.tensor(lp_ref[rows]), tol, what="reference")
    # Samples follow π_θ: empirical frequency of each length matches the exact one.
    lengths = np.array([len(c.ids) for c in groups[0]])
    for L in (1, 2, 3):
        p = float(np.exp(lp_pi[[i for i, s in enumerate(seqs) if len(s) == L]]).sum())
        assert abs((lengths == L).mean() - p) < 4 * math.sqrt(p * (1 - p) / N) + 1e-9
    # Each sample as its own unit so the standard error is over the N samples.
    for est in (kl_k1(a.reshape(N, 1), b.reshape(N, 1)), kl_k3(a.reshape(N, 1), b.reshape(N, 1))):
        assert abs(est.mean - exact) < 4 * est.se, (est, exact)
        assert est.se < 0.25 * exact
    # π_θ = π_sft: both estimators are exactly zero.
    assert kl_k1(a, a).mean == 0 and kl_k3(a, a).mean == 0


# ------------------------------------------------------------------------------------ win rate
def test_win_rate_counts_ties_half_and_bootstraps():
    r_pol = np.array([[1.0, 2.0], [0.0, 0.0], [3.0, -1.0]])
    r_base = np.array([[0.0, 2.0], [1.0, 0.0], [2.0, 0.0]])
    assert outcomes(r_pol, r_base).tolist() == [[1, 0.5], [0, 0.5], [1, 0]]
    wr = win_rate(r_pol, r_base, n_boot=2000, seed=0)
    assert wr.mean == pytest.approx(3 / 6) and (wr.wins, wr.ties, wr.losses) == (2, 2, 2)
    assert wr.ci_low <= wr.mean <= wr.ci_high
    assert win_rate(r_pol, r_base, n_boot=2000, seed=0) == wr  # seeded
    same = win_rate(r_pol, r_pol)
    assert (same.mean, same.ci_low, same.ci_high) == (0.5, 0.5, 0.5)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(400, 2)), rng.normal(size=(400, 2))
    wr = win_rate(x, y, seed=1)
    assert wr.ci_low < 0.5 < wr.ci_high and wr.ci_high - wr.ci_low < 0.15
    ci = mean_ci(np.array([[1.0], [2.0], [3.0], [4.0]]), 0.95)
    half = 1.959964 * np.std([1, 2, 3, 4], ddof=1) / 2
    assert (ci.mean, ci.ci_low, ci.ci_high) == pytest.approx((2.5, 2.5 - half, 2.5 + half), abs=1e-5)


# ---------------------------------------------------------------------------------- end to end
JUDGE = '''
import hashlib

def noise(prompts, completions):
    """A continuous, deterministic judge: a hash of the text mapped to [0, 1) (ties are then rare)."""
    return [int(hashlib.sha256((p + c).encode()).hexdigest()[:8], 16) / 2**32 for p, c in zip(prompts, completions)]
'''


@pytest.fixture()
def setup_eval(tmp_path, tiny_model_dir, tiny_tokenizer, corpus, monkeypatch):
    from exoalign.models import build_model, tiny_config

    (tmp_path / "judge.py").write_text(JUDGE, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": " ".join(c.split()[:3]) + f" {i}"}) + "\n"
                               for i, c in enumerate(corpus[:24])), encoding="utf-8")
    other = tmp_path / "other"
    build_model(tiny_config(len(tiny_tokenizer)), seed=7, tokenizer=tiny_tokenizer).save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    return tmp_path, prompts, tiny_model_dir, other


def _eval(sft, prompts, out, checkpoints, *extra):
    return cli(["eval", f"checkpoints=[{','.join(map(str, checkpoints))}]", f"sft_model={sft}",
                f"prompts={prompts}", "oracle=judge:noise", f"output={out}", "max_new_tokens=6",
                "temperature=0.8", "device=cpu", *extra])


def test_eval_sft_against_itself(setup_eval):
    """π_θ = π_sft: KL exactly 0 (both estimators); win rate against independent SFT samples ≈ 0.5."""
    tmp, prompts, sft, _ = setup_eval
    out = tmp / "self.json"
    assert _eval(sft, prompts, out, [sft], "samples_per_prompt=2") == 0
    data = json.loads(out.read_text())
    assert data["schema"] == "exoalign.eval/1" and data["complete"] is True
    (r,) = data["results"]
    assert r["kl"] == 0.0 and r["kl_k3"] == 0.0
    wr = r["win_rate"]
    assert wr["wins"] + wr["ties"] + wr["losses"] == 48
    assert wr["ci_low"] < 0.5 < wr["ci_high"] and abs(wr["mean"] - 0.5) < 0.2
    assert r["reward"]["ci_low"] < r["reward"]["mean"] < r["reward"]["ci_high"]
    samples = [json.loads(line) for line in (tmp / "self.samples" / f"{eval_mod._safe(r['name'])}.jsonl").open()]
    assert len(samples) == 24 and all(len(s["completions"]) == 2 for s in samples)
    assert np.mean([np.mean(s["rewards"]) for s in samples]) == pytest.approx(r["reward"]["mean"])


def test_eval_keeps_freed_memory_on_cpu(setup_eval, monkeypatch):
    """An evaluation with checkpoints to do asks for glibc's kept-memory settings on CPU (exoalign.hardware)."""
    tmp, prompts, sft, _ = setup_eval
    calls = []
    monkeypatch.setattr(eval_mod, "keep_freed_memory", lambda **kw: calls.append(1) or True)
    assert _eval(sft, prompts, tmp / "kept.json", [sft], "win_rate=false") == 0
    assert calls == [1]


def test_eval_resumes_per_checkpoint(setup_eval, monkeypatch):
    tmp, prompts, sft, other = setup_eval
    ref, out = tmp / "ref.json", tmp / "out.json"
    assert _eval(sft, prompts, ref, [other, sft], "max_prompts=6") == 0
    real, calls = eval_mod._save, []

    def save_then_die(path, state):
        real(path, state)
        calls.append(1)
        if len(state["results"]) == 1:
            raise KeyboardInterrupt  # killed right after the first checkpoint was recorded

    monkeypatch.setattr(eval_mod, "_save", save_then_die)
    assert _eval(sft, prompts, out, [other, sft], "max_prompts=6") == 130
    monkeypatch.setattr(eval_mod, "_save", real)
    assert len(json.loads(out.read_text())["results"]) == 1
    assert _eval(sft, prompts, out, [other, sft], "max_prompts=6") == 0
    a, b = json.loads(ref.read_text()), json.loads(out.read_text())
    assert a["results"] == b["results"] and a["baseline"] == b["baseline"]
    assert b["results"][0]["kl"] > 0 and b["results"][0]["kl_k3"] > 0 and b["results"][1]["kl"] == 0
    # Other settings on the same output are refused.
    assert _eval(sft, prompts, out, [other, sft], "max_prompts=6", "temperature=1.0") == 2


def test_expand_training_output_dir(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    for step in (10, 2, 30):
        d = run / f"checkpoint-{step}"
        shutil.copytree(tiny_model_dir, d)
        if step != 30:  # checkpoint-30 is torn: no COMPLETE marker
            (d / "COMPLETE").write_text("{}")
            (d / "trainer_state.json").write_text(json.dumps({"step": step}))
    shutil.copytree(tiny_model_dir, run / "final")
    (run / "final" / "COMPLETE").write_text("{}")
    got = expand_checkpoints([str(run), str(tiny_model_dir)])
    assert [(c.name, c.step) for c in got[:3]] == [("run/checkpoint-2", 2), ("run/checkpoint-10", 10), ("run/final", None)]
    assert got[3].path == str(tiny_model_dir)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["oracle=null"], "exactly one of reward_model and oracle"),
        (["reward_model=x"], "exactly one"),
        (["output=results.csv"], "must be a .json file"),
        (["samples_per_prompt=0"], "samples_per_prompt"),
        (["kl_temperature=-1"], "kl_temperature"),
        (["checkpoints=[]"], "no checkpoints"),
    ],
)
def test_eval_bad_input_exits_2(setup_eval, capsys, extra, needle):
    tmp, prompts, sft, _ = setup_eval
    assert _eval(sft, prompts, tmp / "o.json", [sft], *extra) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp / "o.json").exists()


def test_eval_missing_checkpoint_exits_2(setup_eval, capsys):
    tmp, prompts, sft, _ = setup_eval
    empty = tmp / "empty-run"
    empty.mkdir()
    assert _eval(sft, prompts, tmp / "o.json", [empty]) == 2
    assert "no model here" in capsys.readouterr().err


@pytest.mark.parametrize("sample_dtype", ["model", "bfloat16"])
def test_a_model_held_in_memory_is_evaluated_as_its_saved_directory(setup_eval, sample_dtype):
    """``run(cfg, models={path: model})``: a model the caller holds (the demo's last training step) is evaluated
    under the path it is named by, which need not exist, with the very samples, rewards and KL of the same weights
    saved and loaded; nothing the caller patched into its modules is used, and its weights are left as they were."""
    from exoalign.eval.evaluate import EvalConfig, run
    from exoalign.models import load_causal_lm

    tmp, prompts, sft, other = setup_eval
    held = load_causal_lm(str(other)).train()

    def boom(*args, **kwargs):
        raise AssertionError("the caller's module was run")

    held.transformer.h[0].mlp.forward = boom  # a training-time patch must not reach the evaluation
    before = {k: v.clone() for k, v in held.state_dict().items()}
    common = dict(sft_model=str(sft), prompts=str(prompts), oracle="judge:noise", max_new_tokens=6, temperature=0.8,
                  device="cpu", sample_dtype=sample_dtype, max_prompts=8, samples_per_prompt=2, win_rate=False)
    a = json.loads(run(EvalConfig(checkpoints=[str(other)], output=str(tmp / "disk.json"), **common)).read_text())
    name = str(tmp / "runs" / "exo" / "checkpoint-5")
    b = json.loads(run(EvalConfig(checkpoints=[name], output=str(tmp / "mem.json"), **common),
                       models={name: held}).read_text())
    (ra,), (rb,) = a["results"], b["results"]
    assert (rb["checkpoint"], rb["name"], rb["run"], rb["step"]) == (name, "exo/checkpoint-5", "exo", 5)
    for key in ("reward", "kl", "kl_k3", "kl_se", "length", "finished"):
        assert ra[key] == rb[key], key
    assert ra["kl"] > 0
    sa = (tmp / "disk.samples" / f"{eval_mod._safe(ra['name'])}.jsonl").read_text()
    sb = (tmp / "mem.samples" / f"{eval_mod._safe(rb['name'])}.jsonl").read_text()
    assert sa == sb
    assert held.training and all(torch.equal(before[k], v) for k, v in held.state_dict().items())
    assert all(p.requires_grad for p in held.parameters())
