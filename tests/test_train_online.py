"""``exoalign train`` online (``online.rounds >= 1``): rounds of sampling from the current policy, scoring with an
oracle, importance-corrected targets, training through the one loop; per-round metrics, reloading, exact resume,
the sampler's log-probs, bad settings."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from numerics import EPS, assert_close_scaled, rel_tol
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from exoalign import cli
from exoalign import sampling as generation
from exoalign.config import load_config
from exoalign.errors import ConfigError, InputError
from exoalign.online import OnlineCollator, round_features, round_prompts, train_online
from exoalign.online import rounds as online
from exoalign.train.config import TrainConfig
from exoalign.train.engine import read_metrics
from exoalign.train.loop import train
from exoalign.train.step import compute_loss, grouped_logps

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
ORACLE = '''
def f(prompts, completions):
    """Ten times the share of the letter e: a reward a random tiny model can move."""
    return [10.0 * c.count("e") / (1 + len(c)) for c in completions]
'''
KEYS = ("online/reward", "online/kl", "online/ess", "online/ess_policy", "online/loss", "online/length")


def oracle_file(tmp_path: Path) -> Path:
    path = tmp_path / "oracle.py"
    path.write_text(ORACLE, encoding="utf-8")
    return path


def make_cfg(tmp_path: Path, *overrides: str, name: str = "run") -> TrainConfig:
    """The smoke config's tiny scratch GPT-2, online: 2 rounds of 8 prompts × K=4, 12 new tokens, β_π = 1."""
    base = [f"train.output_dir={tmp_path / name}", f"train.ref_cache_dir={tmp_path / 'cache'}", "train.log_every=1",
            "train.save_every=0", "train.warmup_steps=0", "train.lr=3e-4", "train.scheduler=linear",
            "data.eval_fraction=0", "loss.beta_pi=1.0", "online.rounds=2", "online.k=4",
            "online.prompts_per_round=8", "online.steps_per_round=2", "online.max_new_tokens=12",
            f"online.oracle={oracle_file(tmp_path)}:f"]
    return load_config(TrainConfig, SMOKE, base + list(overrides))


def online_records(run: Path) -> list[dict]:
    return [r for r in read_metrics(run) if "online/round" in r]


def train_records(run: Path) -> list[dict]:
    return [r for r in read_metrics(run) if "loss" in r]


def test_two_rounds_train_log_and_the_final_model_reloads(tmp_path):
    """Two rounds: one online record per round at its last step, with finite metrics; π_0 = π_sft so the first
    round's sample KL is exactly 0 and the second's is positive; at the first step of each round p is uniform
    (β_π = 1, sampling temperature = loss temperature: log π_θ − corrected reference = 0, so every implicit
    reward is 0); ``final`` reloads with from_pretrained and reproduces the loss the in-memory model logged on the
    last round's groups; the weights moved."""
    cfg = make_cfg(tmp_path)
    final = train(cfg)  # the offline entry point dispatches to train_online
    run = final.parent
    recs = online_records(run)
    assert [r["step"] for r in recs] == [2, 4] and [r["online/round"] for r in recs] == [0, 1]
    for r in recs:
        assert all(math.isfinite(r[k]) for k in KEYS)
        assert 0 < r["online/ess"] <= 1 and 0 < r["online/ess_policy"] <= 1
    rec0 = json.loads((run / "online" / "round-00000.json").read_text())
    n = max(len(c) for g in rec0["completion_ids"] for c in g)
    scale = max(abs(x) for g in rec0["sft_logps"] for x in g)
    # log μ comes from the sampler's KV-cached decode, log π_sft from a padded forward pass: the same fp32
    # sequence log-prob (a sum of n per-token terms, each behind a vocabulary-long logsumexp) in another order.
    assert abs(recs[0]["online/kl"]) <= rel_tol(torch.float32, n) * scale
    assert recs[1]["online/kl"] > 1e-4
    steps = train_records(run)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for first in (steps[0], steps[2]):
        assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-4)
        assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    assert abs(steps[1]["rewards/margins"]) > 1e-3  # after one update p has left uniform

    model = AutoModelForCausalLM.from_pretrained(final).eval()
    record = json.loads((run / "online" / "round-00001.json").read_text())
    feats, _ = round_features(record, cfg.loss.beta_pi, cfg.loss.beta_r)
    from exoalign.models import load_tokenizer

    tok = load_tokenizer(str(final))
    batch = OnlineCollator(tok.pad_token_id)(feats)
    with torch.no_grad():
        loss, _ = compute_loss(model, batch, cfg.loss)
    assert float(loss) == pytest.approx(recs[1]["online/loss"], rel=1e-4, abs=1e-6)
    # The round's ESS of p, which the run computed from the same forward pass as its loss: that of a separate
    # pass of the saved model (the same batches; fp32, ~12-token sums: rounding only).
    policy = online.policy_table(model, feats, tok.pad_token_id, batch_size=cfg.train.ref_batch_size or
                                 cfg.train.batch_size, temperature=cfg.loss.temperature,
                                 prefix_sharing=cfg.train.prefix_sharing)
    ref = torch.tensor([f["ref_logps"] for f in feats], dtype=torch.float64)
    log_p = online.masked_log_softmax(cfg.loss.beta_pi * (policy.double() - ref), None)
    assert float(online.ess(log_p).mean()) == pytest.approx(recs[1]["online/ess_policy"], rel=1e-4)
    init, trained = load_file(str(run / "init" / "model.safetensors")), load_file(str(final / "model.safetensors"))
    assert all(not torch.equal(init[k], trained[k]) for k in trained)


def test_round_prompts_cover_every_prompt_before_repeating():
    """Rounds take consecutive chunks of seeded shuffles: 3 rounds of 4 of 6 prompts use each prompt twice."""
    seen = [i for r in range(3) for i in round_prompts(6, 4, seed=0, r=r)]
    assert sorted(seen) == sorted(list(range(6)) * 2)
    assert sorted(seen[:6]) == list(range(6))
    assert round_prompts(6, 4, seed=0, r=1) == round_prompts(6, 4, seed=0, r=1) != round_prompts(6, 4, seed=1, r=1)


class _Killed(BaseException):
    """Stands for SIGKILL: a BaseException, so no ``except Exception`` on the way cleans anything up."""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("online-full")
    cfg = make_cfg(tmp, "online.steps_per_round=4", "train.save_every=2", name="full")
    return Path(train_online(cfg)), cfg


@pytest.mark.parametrize(
    ("where", "kill_at"), [("compute_loss", 3), ("compute_loss", 6), ("judge_texts", 2)],
    ids=["mid-round-0", "start-of-round-1", "sampling-round-1"],
)
def test_resume_after_a_kill_is_exact(tmp_path, monkeypatch, uninterrupted, where, kill_at):
    """Killed during training step 3, during step 6, or while round 1 is being scored (checkpoints every 2 steps,
    rounds of 4): resumed from step 2 (in round 0), from step 4 (the round boundary, whose checkpoint was written
    after round 1 was sampled and saved) or from step 2 again (round 1 is sampled afresh at step 4), the run ends
    with the same loss log, per-round metrics, sample files and weights as an uninterrupted one, bit for bit."""
    full_final, full_cfg = uninterrupted
    cfg = make_cfg(tmp_path, "online.steps_per_round=4", "train.save_every=2", name="cut")
    real, calls = getattr(online, where), [0]

    def dies_at(*a, **kw):
        if where == "judge_texts" or torch.is_grad_enabled():  # training micro-batches, not round-end evaluation
            calls[0] += 1
            if calls[0] == kill_at:
                raise _Killed
        return real(*a, **kw)

    monkeypatch.setattr(online, where, dies_at)
    with pytest.raises(_Killed):
        train_online(cfg)
    monkeypatch.setattr(online, where, real)
    resumed = train_online(make_cfg(tmp_path, "online.steps_per_round=4", "train.save_every=2", "train.resume=true",
                                    name="cut"))

    def log(run: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in read_metrics(run)]

    assert log(resumed.parent) == log(full_final.parent)
    a, b = load_file(str(full_final / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for r in (0, 1):
        name = f"online/round-{r:05d}.json"
        assert (resumed.parent / name).read_text() == (full_final.parent / name).read_text()


@pytest.mark.slow
def test_sigkilled_cli_run_resumes_exactly(tmp_path, uninterrupted):
    """The real thing through the CLI: ``exoalign train`` online, SIGKILLed right after its step-2 checkpoint
    (in round 0 of 2 rounds × 4 steps), then ``--resume``: the same loss log and weights as the uninterrupted
    in-process run of the module fixture."""
    full_final, _ = uninterrupted
    out = tmp_path / "killed"
    args = [f"train.output_dir={out}", f"train.ref_cache_dir={tmp_path / 'cache'}", "train.log_every=1",
            "train.save_every=2", "train.warmup_steps=0", "train.lr=3e-4", "train.scheduler=linear",
            "data.eval_fraction=0", "loss.beta_pi=1.0", "online.rounds=2", "online.k=4",
            "online.prompts_per_round=8", "online.steps_per_round=4", "online.max_new_tokens=12",
            f"online.oracle={oracle_file(tmp_path)}:f"]
    cmd = [sys.executable, "-m", "exoalign.cli", "train", "--config", str(SMOKE), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / "checkpoint-2" / "COMPLETE").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    err = proc.communicate()[1]
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
    assert not (out / "final").exists()  # really cut short
    resumed = subprocess.run([*cmd, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    def log(run: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in read_metrics(run)]

    got, want = log(out), log(full_final.parent)
    assert [r.get("step") for r in got] == [r.get("step") for r in want]
    for g, w in zip(got, want):
        for key in ("loss", "online/reward", "online/kl", "online/loss"):
            assert g.get(key) == pytest.approx(w.get(key), abs=1e-5), key
    a, b = load_file(str(full_final / "model.safetensors")), load_file(str(out / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_sampler_logps_are_those_of_the_distribution_sampled(tmp_path, monkeypatch):
    """The round's ``sampler_logps`` equal, completion by completion, the sum over its sampled tokens (EOS
    included) of log softmax(logits / T) as generate drew them (recorded inside the Gumbel-max sampler) at the
    sampling temperature T = 0.7; the π_sft log-probs are at the loss temperature 1.0 (π_0 = π_sft, so they are
    the starting policy's at T = 1.0) and differ from the sampler's."""
    steps: list[list[torch.Tensor]] = []

    class Recording(generation.ScoredDraw):  # the sampler's draw; its scores arrive divided by T
        def next_tokens(self, input_ids, scores):
            choice = super().next_tokens(input_ids, scores)  # (R,) the drawn tokens
            steps.append(torch.log_softmax(scores.float(), -1).gather(1, choice[:, None]).squeeze(1))
            return choice

    monkeypatch.setattr(generation, "ScoredDraw", Recording)
    words = "the film was a long and quiet story about two old friends who walk home".split()
    prompts = tmp_path / "prompts.jsonl"  # prompts of 1 to 8 words: generate left-pads them, training too
    prompts.write_text("".join(json.dumps({"prompt": " ".join(words[i : i + 1 + i])}) + "\n" for i in range(8)))
    cfg = make_cfg(tmp_path, "online.rounds=1", "online.steps_per_round=1", "online.temperature=0.7",
                   "online.generation_batch_size=8", f"data.train_file={prompts}")
    final = train_online(cfg)
    record = json.loads((final.parent / "online" / "round-00000.json").read_text())
    assert len({len(p) for p in record["prompt_ids"]}) >= 4  # padding really differs between rows
    per_token = torch.stack(steps, 1)  # (R, steps): one generate call, rows = prompt n × K + j
    K = cfg.online.k
    # generate's cached decoding vs one forward pass of the whole sequence: the same fp32 model in other shapes,
    # so rounding over the vocabulary's reduction, relative to the largest sequence log-prob
    tol = rel_tol(torch.float32, AutoModelForCausalLM.from_pretrained(final.parent / "init").config.vocab_size)
    want = torch.zeros(len(record["completion_ids"]), K)
    for n, group in enumerate(record["completion_ids"]):
        for j, ids in enumerate(group):
            want[n, j] = per_token[n * K + j, : len(ids)].sum()
    assert_close_scaled(torch.tensor(record["sampler_logps"]), want, tol, what="sampler log-probs vs scores")
    init = AutoModelForCausalLM.from_pretrained(final.parent / "init").eval()
    feats = [{"index": n, "prompt_ids": p, "completion_ids": c}
             for n, (p, c) in enumerate(zip(record["prompt_ids"], record["completion_ids"]))]
    from exoalign.data import GroupCollator

    batch = GroupCollator(0)(feats)
    with torch.no_grad():
        at_1, _ = grouped_logps(init, batch, temperature=1.0)  # (N, K)
        at_07, _ = grouped_logps(init, batch, temperature=0.7)
    assert_close_scaled(torch.tensor(record["sft_logps"]), at_1, tol, what="π_sft log-probs at T = 1")
    assert_close_scaled(torch.tensor(record["sampler_logps"]), at_07, tol, what="sampler log-probs at T = 0.7")
    assert (at_1 - at_07).abs().max() > 0.1


@pytest.mark.parametrize("loss", ["dpo", "rloo", "ppo"])
def test_dpo_rloo_and_ppo_train_online(tmp_path, loss):
    """The other online losses run through the same rounds: finite losses every step, two round records, weights
    moved; rloo's and ppo's first step sees advantages of the KL-shaped reward (not all zero)."""
    final = train_online(make_cfg(tmp_path, f"loss.name={loss}", "online.steps_per_round=1"))
    steps = train_records(final.parent)
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) for r in steps)
    assert len(online_records(final.parent)) == 2
    if loss in ("rloo", "ppo"):
        assert abs(steps[0]["rewards/margins"]) > 1e-4
    init = load_file(str(final.parent / "init" / "model.safetensors"))
    trained = load_file(str(final / "model.safetensors"))
    assert any(not torch.equal(init[k], trained[k]) for k in trained)


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        (["online.oracle=null"], "online.oracle", "exactly one of oracle and reward_model"),
        (["online.reward_model=some/dir"], "online.reward_model", "both are set"),
        (["online.k=1"], "online.k", "at least 2"),
        (["online.temperature=0"], "online.temperature", "must be > 0"),
        (["online.top_k=20"], "online.top_k", "not corrected"),
        (["online.top_p=0.9"], "online.top_p", "not corrected"),
        (["online.steps_per_round=0"], "online.steps_per_round", ">= 1"),
        (["online.max_new_tokens=40"], "online.max_new_tokens", "exceeds data.max_length"),
        (["loss.name=ipo"], "loss.name", "no online form"),
        (["online.eval_samples=0"], "online.eval_samples", ">= 1"),
        (["online.rounds=0", "loss.name=rloo"], "loss.name", "current policy only"),
        (["online.rounds=0", "loss.name=ppo"], "loss.name", "current policy only"),
        (["loss.name=ppo", "loss.temperature=0.7"], "loss.temperature", "sampling temperature"),
        (["loss.name=ppo", "loss.params={clip: 1.5}"], "loss.params.clip", "(0, 1)"),
    ],
)
def test_bad_settings_are_one_line_config_errors(tmp_path, overrides, field, words):
    with pytest.raises(ConfigError) as e:
        make_cfg(tmp_path, *overrides)
    assert e.value.field == field and words in str(e.value) and "Fix:" in str(e.value)
    assert "\n" not in str(e.value)


def test_groups_no_step_trains_on_are_refused_before_anything_is_written(tmp_path):
    """steps_per_round × batch_size × grad_accum × processes < prompts_per_round (checked once the number of
    processes is known)."""
    cfg = make_cfg(tmp_path, "online.prompts_per_round=20", "train.batch_size=4")
    with pytest.raises(ConfigError) as e:
        train_online(cfg)
    assert e.value.field == "online.prompts_per_round" and "never be trained on" in str(e.value)
    assert not (tmp_path / "run").exists()


def test_cli_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys):
    """From the command line: a bad setting, too many prompts per round and an oracle that does not exist each
    exit 2 with one ``error:`` line, before anything is written."""
    out = tmp_path / "run"
    common = ["train", "--config", str(SMOKE), f"train.output_dir={out}", "data.eval_fraction=0",
              "online.rounds=2", "online.max_new_tokens=8"]
    cases = [["online.top_p=0.5", f"online.oracle={oracle_file(tmp_path)}:f"],
             ["online.prompts_per_round=9", f"online.oracle={oracle_file(tmp_path)}:f"],
             [f"online.oracle={tmp_path / 'missing.py'}:f"]]
    for extra in cases:
        assert cli.main(common + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:"), err
        assert not out.exists()


def test_train_online_refuses_offline_configs(tmp_path):
    cfg = load_config(TrainConfig, SMOKE, [f"train.output_dir={tmp_path / 'x'}"])
    with pytest.raises(InputError, match="online.rounds >= 1"):
        train_online(cfg)


def round_zero_gradients(cfg):
    """Train one round, then ``(round 0's record, grad(loss name))``: the flattened gradient of that loss on round
    0's groups at π_0, the policy that sampled them, through the trainer's own ``compute_loss``."""
    final = train_online(cfg)
    record = json.loads((final.parent / "online" / "round-00000.json").read_text())
    feats, _ = round_features(record, cfg.loss.beta_pi, cfg.loss.beta_r)
    model = AutoModelForCausalLM.from_pretrained(final.parent / "init")  # π_0: the policy that sampled round 0
    model.eval()
    batch = OnlineCollator(model.config.pad_token_id or 0)(feats)

    def grad(name: str) -> torch.Tensor:
        model.zero_grad()
        loss, _ = compute_loss(model, batch, replace(cfg.loss, name=name))
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    return record, grad


def test_online_exo_at_round_start_is_rloo_up_to_scale(tmp_path):
    """At the start of a round (π_θ = π_t = μ, β_π = 1, one temperature) p is uniform and EXO's gradient is the
    mean-baseline policy gradient of the KL-shaped reward R = r − β_r (log μ − log π_sft):
    ``∇ KL(p‖q) = −(1/(K β_r)) Σ_i (R_i − R̄) ∇log π_θ(y_i)``, while RLOO's is ``−(1/(K−1)) Σ_i (R_i − R̄) ∇log
    π_θ(y_i)``. So the two gradients on a round's groups are parallel with ratio (K − 1)/(K β_r) — which is why
    the two train alike with one use per sample (Adam removes the scale); they part when samples are reused."""
    cfg = make_cfg(tmp_path, "online.rounds=1", "online.steps_per_round=1")
    _, grad = round_zero_gradients(cfg)

    g_exo, g_rloo = grad("exo"), grad("rloo")
    K, beta_r = cfg.online.k, cfg.loss.beta_r
    assert torch.nn.functional.cosine_similarity(g_exo, g_rloo, dim=0) > 0.9999
    assert float(g_exo.norm() / g_rloo.norm()) == pytest.approx((K - 1) / (K * beta_r), rel=1e-3)


def test_ppo_reuses_a_round_with_its_ratio_and_clip(tmp_path):
    """loss.name=ppo with each round used for 2 steps (loss.params={clip: 0.1}): every step logs ppo/ratio and
    ppo/clip_frac; a round's first step is at π_θ = π_t (ratio 1 up to the rounding of recomputed float32
    sequence log-probs, nothing clipped), its second after one update (ratio moved)."""
    final = train_online(make_cfg(tmp_path, "loss.name=ppo", "loss.params={clip: 0.1}"))
    steps = train_records(final.parent)
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in steps)
    for first in (steps[0], steps[2]):
        # mean of e^{Δ} with |Δ| the float32 rounding of a ~12-token log-prob sum of size ≲ 100: ≲ 1e-4
        assert first["ppo/ratio"] == pytest.approx(1.0, abs=1e-4) and first["ppo/clip_frac"] == 0.0
    assert abs(steps[1]["ppo/ratio"] - 1.0) > 1e-4


def test_ppo_at_round_start_is_rloo(tmp_path):
    """At the start of a round (π_θ = π_t, one temperature) ppo's ratio is 1 and its gradient on the round's groups
    is rloo's, through the trainer's own compute_loss. The ratio is 1 only up to the rounding of the sequence
    log-probs, recomputed in float32 in another batch layout than the sampler's: ``|Δ| ≤ 16 u √T max|log π|``
    (u = 2⁻²³, T tokens per completion), and the gradient differs by that relative amount."""
    cfg = make_cfg(tmp_path, "online.rounds=1", "online.steps_per_round=1", "loss.name=ppo")
    record, grad = round_zero_gradients(cfg)

    T = max(len(c) + 1 for g in record["completion_ids"] for c in g)  # + EOS
    bound = rel_tol(torch.float32, T) * max(abs(x) for g in record["sampler_logps"] for x in g)
    g_ppo, g_rloo = grad("ppo"), grad("rloo")
    # each completion's term is rloo's times ρ_i = e^{Δ_i}, |ρ_i − 1| ≲ bound; a factor 4 for the terms of
    # opposite sign that cancel in a parameter's sum (measured: 3.5e-6 of scale against 4·bound ≈ 1.9e-3)
    assert_close_scaled(g_ppo, g_rloo, 4 * bound)


def test_a_reward_model_scores_the_rounds(tmp_path, tiny_tokenizer):
    """``online.reward_model``: the round's saved rewards are the reward model's scores of the round's (prompt,
    completion) texts, as ``exoalign score`` computes them."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from exoalign.rewards import RewardModelJudge

    rm_cfg = GPT2Config(vocab_size=len(tiny_tokenizer), n_layer=1, n_head=2, n_embd=32, n_positions=128, num_labels=1,
                        pad_token_id=tiny_tokenizer.pad_token_id)
    torch.manual_seed(0)
    rm_dir = tmp_path / "rm"
    GPT2ForSequenceClassification(rm_cfg).save_pretrained(rm_dir)
    tiny_tokenizer.save_pretrained(rm_dir)
    cfg = make_cfg(tmp_path, "online.rounds=1", "online.oracle=null", f"online.reward_model={rm_dir}")
    final = train_online(cfg)
    record = json.loads((final.parent / "online" / "round-00000.json").read_text())
    judge = RewardModelJudge(str(rm_dir), device="cpu")
    K = cfg.online.k
    want = judge([p for p in record["prompts"] for _ in range(K)], [c for g in record["completions"] for c in g])
    got = [r for g in record["rewards"] for r in g]
    assert got == pytest.approx(want, abs=1e-5)
    assert max(got) - min(got) > 1e-4  # the completions get different rewards


def test_lora_uses_the_base_weights_as_pi_sft(tmp_path):
    """With LoRA no copy of π_sft is loaded: the reference is the model with its adapters off. The adapters start
    at zero, so round 0's KL is 0; after training, round 1's samples are scored against the base (log μ ≠ log π_sft,
    where a reference with the adapters left on would give exactly 0); final holds the merged weights."""
    cfg = make_cfg(tmp_path, "model.lora_r=4", "train.lr=3e-3")
    final = train_online(cfg)
    recs = online_records(final.parent)
    rec0 = json.loads((final.parent / "online" / "round-00000.json").read_text())
    n = max(len(c) for g in rec0["completion_ids"] for c in g)
    scale = max(abs(x) for g in rec0["sft_logps"] for x in g)
    # as in test_two_rounds_…: log μ (sampler's decode) and log π_sft (forward pass) differ by fp32 rounding only
    assert abs(recs[0]["online/kl"]) <= rel_tol(torch.float32, n) * scale and abs(recs[1]["online/kl"]) > 1e-4
    record = json.loads((final.parent / "online" / "round-00001.json").read_text())
    mu, sft = torch.tensor(record["sampler_logps"]), torch.tensor(record["sft_logps"])
    assert (mu - sft).abs().max() > 1e-3
    AutoModelForCausalLM.from_pretrained(final)  # merged: plain from_pretrained loads it


def test_rounds_can_sample_from_a_bf16_copy(tmp_path, monkeypatch):
    """``online.sample_dtype=bfloat16``: each round decodes from a bf16 copy of the policy; the round's
    ``sampler_logps`` are that copy's log-probs of its draws, and the policy trains and is saved in fp32."""
    from exoalign.data import GroupCollator

    decoded_in: list[torch.dtype] = []  # the dtype of the weights each decode loop ran on
    decode = generation.HFSampler._decode_rows

    def spy(self, model, *args, **kwargs):
        decoded_in.append(next(model.parameters()).dtype)
        return decode(self, model, *args, **kwargs)

    monkeypatch.setattr(generation.HFSampler, "_decode_rows", spy)
    cfg = make_cfg(tmp_path, "online.rounds=1", "online.steps_per_round=1", "online.temperature=0.7",
                   "online.sample_dtype=bfloat16")
    final = train_online(cfg)
    assert decoded_in and set(decoded_in) == {torch.bfloat16}
    record = json.loads((final.parent / "online" / "round-00000.json").read_text())
    init = AutoModelForCausalLM.from_pretrained(final.parent / "init").eval()
    twin = generation.sampling_copy(init, "bfloat16")
    assert next(twin.parameters()).dtype == torch.bfloat16
    feats = [{"index": n, "prompt_ids": p, "completion_ids": c}
             for n, (p, c) in enumerate(zip(record["prompt_ids"], record["completion_ids"]))]
    batch = GroupCollator(0)(feats)
    with torch.no_grad():
        bf16, _ = grouped_logps(twin, batch, temperature=0.7)
    mu = torch.tensor(record["sampler_logps"])
    # One padded forward of the bf16 copy vs the sampler's cached decode: rounding of the sums, relative to their
    # scale. (Whether the sampler is nearer to this forward than to the fp32 model's is not a test: where torch's
    # bf16 kernels differ between the two paths, e.g. under ATEN_CPU_CAPABILITY=default, their rounding is as large
    # as this tiny model's bf16-fp32 gap.)
    assert_close_scaled(mu, bf16.float(), 16 * EPS[torch.bfloat16], what="sampler log-probs vs the bf16 copy")
    trained = load_file(str(final / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in trained.values())
