"""``compute_loss`` against hand-derived values, the LoRA reference, and the reference table against online
log-probs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from numerics import assert_close_scaled, rel_tol

from exoalign.data import GroupCollator, load_rows, select_k, tokenize_rows
from exoalign.losses import get_loss, pref_targets
from exoalign.models import build_model, tiny_config, train_bpe_tokenizer
from exoalign.train.config import LossConfig, TrainArgs
from exoalign.train.refcache import attach, compute_table
from exoalign.train.setup import make_accelerator
from exoalign.train.step import compute_loss, grouped_logps, reference_logps

DATA = Path(__file__).resolve().parents[1] / "configs" / "data"



@pytest.fixture(scope="module")
def toy():
    pairs = load_rows(DATA / "toy_pairs.jsonl", "pair")[:12]
    groups = load_rows(DATA / "toy_groups.jsonl", "group")[:12]
    texts = [t for r in pairs + groups for t in (r["prompt"], *r["completions"])]
    tok = train_bpe_tokenizer(texts, vocab_size=300, model_max_length=64)
    model = build_model(tiny_config(len(tok), n_positions=64), seed=0, tokenizer=tok).eval()
    kw = {"max_length": 48, "max_prompt_length": 16}
    return tok, model, tokenize_rows(pairs, tok, **kw), tokenize_rows(groups, tok, **kw)


def _batch(tok, data, idx):
    return GroupCollator(tok.pad_token_id)([data[i] for i in idx])


def test_zero_log_ratio_golden_values(toy):
    """With π_θ = π_sft every h_i = 0, so p = uniform over the K completions and (by hand):

    * EXO-pref = KL([½, ½] ‖ [1−ε, ε]) = ½ log(½/(1−ε)) + ½ log(½/ε) = 2.7612… for ε = 1e-3 (DESIGN.md)
    * DPO-pref = −(1−ε) log ½ − ε log ½ = log 2
    * EXO-rw = KL(uniform ‖ softmax(r/β_r)) = Σ_i ¼ (log ¼ − log q_i), q from the rewards of each group
    """
    tok, model, pairs, groups = toy
    batch = _batch(tok, pairs, range(6))
    with torch.no_grad():
        loss, m = compute_loss(model, batch, LossConfig(name="exo", eps=1e-3), ref_model=model)
        assert float(loss) == pytest.approx(0.5 * math.log(0.5 / 0.999) + 0.5 * math.log(0.5 / 0.001), abs=1e-5)
        assert float(loss) == pytest.approx(2.7612, abs=1e-4)
        assert float(m["kl/batch"]) == pytest.approx(0.0, abs=1e-6)
        assert float(m["rewards/margins"]) == pytest.approx(0.0, abs=1e-6)
        loss, _ = compute_loss(model, batch, LossConfig(name="dpo", eps=1e-3), ref_model=model)
        assert float(loss) == pytest.approx(math.log(2), abs=1e-5)

        gb = _batch(tok, groups, range(4))
        loss, m = compute_loss(model, gb, LossConfig(name="exo", target="rw", beta_r=0.5), ref_model=model)
        expected = []
        for f in (groups[i] for i in range(4)):
            r = torch.tensor(f["rewards"]) / 0.5
            log_q = r - torch.logsumexp(r, 0)
            expected.append(float((0.25 * (math.log(0.25) - log_q)).sum()))
        assert float(loss) == pytest.approx(sum(expected) / 4, abs=1e-5)


def test_compute_loss_uses_registry_and_cached_ref(toy):
    """Policy log-probs [B, K] from the [B*K, T] batch, the batch's ref_logps, the registry's loss."""
    tok, model, pairs, _ = toy
    batch = _batch(tok, pairs, [0, 3, 5, 7])
    ref = torch.randn(4, 2)
    batch["ref_logps"] = ref
    cfg = LossConfig(name="exo", beta_pi=0.3, eps=0.01)
    loss, m = compute_loss(model, batch, cfg)
    policy = torch.stack([
        grouped_logps(model, _batch(tok, pairs, [i]))[0][0] for i in [0, 3, 5, 7]
    ])  # (4, 2): each group on its own, no padding shared with others
    want = get_loss("exo")(policy, ref, pref_targets(4, 0.01), 0.3).losses.mean()
    assert float(loss.detach()) == pytest.approx(float(want), abs=1e-4)
    assert float(m["logps/chosen"]) == pytest.approx(float(policy[:, 0].mean()), abs=1e-4)
    assert float(m["logps/rejected"]) == pytest.approx(float(policy[:, 1].mean()), abs=1e-4)
    assert float(m["kl/batch"]) == pytest.approx(float((ref - policy).mean()), abs=1e-4)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.zero_grad()


def test_needs_lengths_loss_gets_them(toy):
    tok, model, pairs, _ = toy
    batch = _batch(tok, pairs, range(4))
    with torch.no_grad():
        loss, m = compute_loss(model, batch, LossConfig(name="simpo", params={"gamma": 0.0}))
        policy, lengths = grouped_logps(model, batch)
        margin = policy[:, 0] / lengths[:, 0] - policy[:, 1] / lengths[:, 1]
        assert float(loss) == pytest.approx(float(-torch.nn.functional.logsigmoid(0.1 * margin).mean()), abs=1e-5)


def test_lora_reference_is_the_base_model(toy):
    peft = pytest.importorskip("peft")
    tok, model, pairs, _ = toy
    batch = _batch(tok, pairs, range(4))
    import copy

    base = copy.deepcopy(model)
    with torch.no_grad():
        want = grouped_logps(base, batch)[0]
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False))
    with torch.no_grad():
        adapted = grouped_logps(lora, batch)[0]
        ref = reference_logps(lora, batch)
    assert not torch.allclose(adapted, want, atol=1e-3)  # the adapters change the policy …
    # … and disabling them gives π_sft back (fp32 rounding of the vocabulary's reduction at most)
    assert_close_scaled(ref, want, rel_tol(torch.float32, model.config.vocab_size), what="adapters disabled")


def test_reference_table_equals_online_logps(toy, tmp_path):
    """The one-pass table (batches of 5, in order) equals log-probs computed per training batch (other padding)."""
    tok, model, _, groups = toy
    rows = load_rows(DATA / "toy_groups.jsonl", "group")[:12]
    rows[3] = select_k([rows[3]], 3, "first")[0]  # a ragged group: a masked slot in the table
    data = tokenize_rows(rows, tok, max_length=48, max_prompt_length=16)
    acc = make_accelerator(TrainArgs(output_dir=str(tmp_path), cpu=True))
    table = compute_table(acc, model, data, tok.pad_token_id, batch_size=5, temperature=0.8)
    assert table.shape == (12, 4) and table[3, 3] == 0.0
    with_ref = attach(data, table)
    for idx in ([0, 7, 3], [11, 2]):
        batch = _batch(tok, with_ref, idx)
        with torch.no_grad():
            online = grouped_logps(model, batch, temperature=0.8)[0].masked_fill(~batch["group_mask"], 0.0)
        # the same fp32 model on other batches (other padding): rounding over the vocabulary per token
        assert_close_scaled(batch["ref_logps"], online, rel_tol(torch.float32, model.config.vocab_size), what="table")


def batch_logps_scale(model, batch) -> torch.Tensor:
    """The largest |sequence log-prob| of the batch: the scale the loss's rounding follows."""
    with torch.no_grad():
        return grouped_logps(model, batch)[0].abs().max()


def test_prefix_sharing_gives_the_same_loss(toy):
    """``train.prefix_sharing`` reaches the log-probs: sharing each prompt across its K completions changes how
    the batch is computed, not the loss, the metrics or the gradients."""
    tok, model, _, groups = toy
    batch = _batch(tok, groups, [0, 5, 9])
    cfg = LossConfig(name="exo", target="rw", beta_r=0.5)
    ref = torch.randn(3, 4)
    batch["ref_logps"] = ref
    grads = []
    results = []
    for sharing in (False, True):
        model.zero_grad()
        loss, m = compute_loss(model, batch, cfg, prefix_sharing=sharing)
        loss.backward()
        grads.append(model.transformer.h[0].attn.c_attn.weight.grad.clone())
        results.append((float(loss.detach()), {k: float(v) for k, v in m.items()}))
    model.zero_grad()
    # two layouts of the same fp32 model: log-probs agree to rel_tol of their size (≈ 30 nats here); the loss and
    # metrics are smooth functions of them with O(1) slopes (β_π = 1 / β_r = 0.5 -> 2): 2 × that, absolutely
    tol = rel_tol(torch.float32, model.config.vocab_size)
    scale = 2 * float(batch_logps_scale(model, batch))
    assert results[1][0] == pytest.approx(results[0][0], abs=tol * scale)
    assert results[1][1] == pytest.approx(results[0][1], abs=tol * scale)
    assert_close_scaled(grads[1], grads[0], tol, what="c_attn grad")


def test_reference_table_with_prefix_sharing(toy, tmp_path):
    """``train.prefix_sharing`` reaches the reference pass: each group's prompt is run once for its completions
    (fewer tokens through the model), the table is the unshared one to rounding, and the cache keeps the two
    apart (a shared run never reads an unshared entry, nor the reverse)."""
    from exoalign.packing import supports_shared_prefix
    from exoalign.train.refcache import ref_logps_table

    tok, model, _, groups = toy
    acc = make_accelerator(TrainArgs(output_dir=str(tmp_path / "out"), cpu=True))
    assert supports_shared_prefix(model)  # its one-off probe runs here, not inside the counted passes
    tokens: list[int] = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: tokens.append(int(kw["input_ids"].numel())),
                                           with_kwargs=True)
    try:
        counted = {}
        tables = {}
        for sharing in (False, True):
            tokens.clear()
            tables[sharing] = compute_table(acc, model, groups, tok.pad_token_id, batch_size=4, temperature=1.0,
                                            prefix_sharing=sharing)
            counted[sharing] = sum(tokens)
    finally:
        hook.remove()
    # K = 4 completions per prompt: the shared layout holds each prompt once instead of 4 times
    assert counted[True] < 0.8 * counted[False]
    # two layouts of the same fp32 model: sequence sums agree to fp32 rounding over the vocabulary per token
    assert_close_scaled(tables[True], tables[False], rel_tol(torch.float32, model.config.vocab_size),
                        what="shared reference table")

    kw = dict(cache_dir=tmp_path / "cache", model_id="toy", tokenizer=tok, settings={}, batch_size=4,
              temperature=1.0, get_model=lambda: model)
    plain, hit = ref_logps_table(acc, groups, **kw)
    assert not hit and torch.equal(plain, tables[False])
    shared, hit = ref_logps_table(acc, groups, prefix_sharing=True, **kw)
    assert not hit and torch.equal(shared, tables[True])  # computed, not the unshared entry
    assert ref_logps_table(acc, groups, prefix_sharing=True, **kw)[1]  # its own entry next time
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2
