"""exoalign.attention: the CPU training attention equals transformers' SDPA attention (fp32: to rounding; bf16: no
less accurate than the flash kernel it replaces), keeps padded rows finite, hands everything else to transformers
unchanged, and is active only inside its block."""

from __future__ import annotations

import math

import pytest
import torch
from numerics import EPS, assert_close_scaled, rel_tol
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import exoalign.attention as attention
from exoalign.attention import cpu_attention, training_attention

B, H, KV, T, D = 2, 6, 2, 20, 16


class _Module(torch.nn.Module):
    """What transformers' SDPA function reads from an attention module."""

    num_key_value_groups = H // KV
    is_causal = True


def _inputs(dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, n, T, D, generator=g, dtype=dtype) for n in (H, KV, KV))
    return tuple(x.requires_grad_() for x in (q, k, v))


def _mask(kind: str) -> torch.Tensor:
    """A causal mask with left padding on row 0 (its first 5 positions attend to nothing but themselves... or to
    nothing at all for ``kind='empty_row'``), bool or additive float."""
    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None, None].repeat(B, 1, 1, 1)
    allowed[0, :, :, :5] = False
    for i in range(5):
        allowed[0, 0, i, i] = kind != "empty_row"
    if kind == "float":
        return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return allowed


def _run(fn, q, k, v, mask, seed: int = 1):
    out = fn(_Module(), q, k, v, mask, scaling=D ** -0.5)[0]
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    grads = torch.autograd.grad((out.float() * w).sum(), (q, k, v))
    return out.detach().float(), [x.float() for x in grads]


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fp32_equals_transformers_sdpa(kind: str) -> None:
    q, k, v = _inputs()
    mask = _mask(kind)
    out, grads = _run(cpu_attention, q, k, v, mask)
    ref_out, ref_grads = _run(sdpa_attention_forward, q, k, v, mask)
    tol = rel_tol(torch.float32, T * D)  # a softmax over T keys of D-long dot products, and its backward
    assert_close_scaled(out, ref_out, tol, what="output")
    for name, a, e in zip("qkv", grads, ref_grads):
        assert_close_scaled(a, e, tol, what=f"d{name}")


def _float64_reference(q, k, v, mask):
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    kk, vv = (x.repeat_interleave(H // KV, dim=1) for x in (k, v))
    s = q @ kk.transpose(-1, -2) * D ** -0.5
    s = s.masked_fill(~mask, torch.finfo(torch.float64).min) if mask.dtype == torch.bool else s + mask.double()
    out = (torch.softmax(s, -1) @ vv).transpose(1, 2)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).double()
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    return out.detach(), list(grads)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_bf16_plain_path_no_less_accurate_than_flash(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under bf16 autocast with gradients (training), short attention runs as plain matmuls; its error against
    fp64 is at most twice that of the flash kernel it replaces (plus one bf16 rounding of the scale)."""
    calls = []
    plain = attention._plain
    monkeypatch.setattr(attention, "_plain", lambda *a: calls.append(1) or plain(*a))
    q, k, v = _inputs()
    mask = _mask(kind)
    exact_out, exact_grads = _float64_reference(q, k, v, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = _run(cpu_attention, q, k, v, mask)
        assert calls, "the plain path was not taken"
        flash_out, flash_grads = _run(sdpa_attention_forward, q, k, v, mask)
    for what, a, f, e in [("output", out, flash_out, exact_out)] + [
            (f"d{n}", a, f, e) for n, a, f, e in zip("qkv", grads, flash_grads, exact_grads)]:
        scale = e.abs().max().item()
        err, flash_err = ((x.double() - e).abs().max().item() for x in (a, f))
        assert err <= 2 * flash_err + EPS[torch.bfloat16] * scale, (what, err, flash_err, scale)


def test_row_with_no_allowed_key_stays_finite() -> None:
    q, k, v = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = _run(cpu_attention, q, k, v, _mask("empty_row"))
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)


def test_everything_else_goes_to_transformers_unchanged() -> None:
    q, k, v = _inputs()
    a = cpu_attention(_Module(), q, k, v, None, scaling=D ** -0.5)[0]  # no mask: causal flash
    e = sdpa_attention_forward(_Module(), q, k, v, None, scaling=D ** -0.5)[0]
    assert torch.equal(a, e)
    a = cpu_attention(_Module(), q, k, v, _mask("bool"), dropout=0.1, scaling=D ** -0.5)[0]  # dropout
    assert a.shape == (B, T, H, D)
    # One key/value head per query head: nothing to gain, transformers' path.
    q1, k1, v1 = (torch.randn(B, H, T, D) for _ in range(3))
    mha = _Module()
    mha.num_key_value_groups = 1
    a = cpu_attention(mha, q1, k1, v1, _mask("bool"), scaling=D ** -0.5)[0]
    e = sdpa_attention_forward(mha, q1, k1, v1, _mask("bool"), scaling=D ** -0.5)[0]
    assert torch.equal(a, e)


def test_long_attention_keeps_the_flash_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention, "PLAIN_MAX_KEYS", T - 1)
    monkeypatch.setattr(attention, "_plain", lambda *a: pytest.fail("plain path above PLAIN_MAX_KEYS"))
    q, k, v = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = _run(cpu_attention, q, k, v, _mask("bool"))
    assert torch.isfinite(out).all()


def test_block_swaps_the_sdpa_entry_and_restores_it() -> None:
    before = ALL_ATTENTION_FUNCTIONS["sdpa"]
    with training_attention():
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is cpu_attention
        with training_attention():
            assert ALL_ATTENTION_FUNCTIONS["sdpa"] is cpu_attention
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is cpu_attention
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is before
    with training_attention(enabled=False):
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is before
    with pytest.raises(RuntimeError), training_attention():
        raise RuntimeError("inside")
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is before


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=H, num_key_value_heads=KV, max_position_embeddings=64,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg)


def _model_grads(model, ids, am, autocast: bool, inside: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), training_attention(inside):
        logits = model(input_ids=ids, attention_mask=am).logits.float()
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3)) * am[..., None]
    (logits * w).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_llama_with_padding_trains_the_same() -> None:
    """A GQA Llama on a left-padded batch: fp32 logits and every gradient equal transformers' attention to
    rounding; under bf16 autocast they are as far from fp32 as transformers' own bf16 attention is (2× slack)."""
    model = _llama()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 96, (B, T), generator=g)
    am = torch.ones(B, T, dtype=torch.long)
    am[0, :6] = 0
    ref = _model_grads(model, ids, am, autocast=False, inside=False)
    ours = _model_grads(model, ids, am, autocast=False, inside=True)
    tol = rel_tol(torch.float32, T * 48, safety=64)  # two layers deep, a backward through both
    keep = am.bool()
    assert_close_scaled(ours[0][keep], ref[0][keep], tol, what="fp32 logits")
    for n in ref[1]:
        assert_close_scaled(ours[1][n], ref[1][n], tol, what=f"fp32 grad {n}")
    theirs16 = _model_grads(model, ids, am, autocast=True, inside=False)
    ours16 = _model_grads(model, ids, am, autocast=True, inside=True)
    for what, a, f, e in [("logits", ours16[0][keep], theirs16[0][keep], ref[0][keep])] + [
            (n, ours16[1][n], theirs16[1][n], ref[1][n]) for n in ref[1]]:
        scale = e.abs().max().item()
        err, their_err = ((x - e).abs().max().item() for x in (a, f))
        assert math.isfinite(err) and err <= 2 * their_err + EPS[torch.bfloat16] * scale, (what, err, their_err)


def test_trainer_recompute_under_checkpointing_uses_the_same_attention(tmp_path, tiny_tokenizer, monkeypatch):
    """With gradient checkpointing the backward recomputes each layer's forward: it must run the same attention as
    the forward did (the training step enters the block around backward too), so a bf16 step takes the plain path
    twice per layer with checkpointing and once without."""
    import exoalign

    calls = []
    plain = attention._plain
    monkeypatch.setattr(attention, "_plain", lambda *a: calls.append(1) or plain(*a))
    pairs = [{"prompt": "the movie was", "chosen": " great and wonderful", "rejected": " terrible"},
             {"prompt": "what a", "chosen": " fantastic surprise", "rejected": " waste of a whole evening"}]
    counts = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=H, num_key_value_heads=KV, max_position_embeddings=128,
                          attn_implementation="sdpa", pad_token_id=tiny_tokenizer.pad_token_id)
        model = LlamaForCausalLM(cfg)
        calls.clear()
        exoalign.Trainer(model, pairs, tokenizer=tiny_tokenizer, config={
            "loss": {"name": "exo"}, "model": {"gradient_checkpointing": ckpt}, "data": {"max_length": 32},
            "train": {"max_steps": 1, "batch_size": 2, "mixed_precision": "bf16", "prefix_sharing": True,
                      "ref_cache_dir": str(tmp_path / "cache")}}).train()
        counts.append(len(calls))
    assert counts[0] > 0 and counts[1] == 2 * counts[0], counts


@pytest.mark.parametrize("padded_prompt", [False, True])
def test_completion_attention_equals_the_masked_dense_one(padded_prompt: bool) -> None:
    """The completion columns of prompt-shared rows, attended as prompt part + one causal block per completion
    merged by log-sum-exp (``_CompletionAttention``), equal the dense masked attention in value and in the
    gradients of q, k and v, on rows of different layouts (ragged completions, trailing padding, a left-padded
    prompt). Padding columns are not compared: nothing real reads them, and the two paths treat them differently."""
    from exoalign.packing import shared_prefix_mask

    P, L, heads, kv, d = 40, 100, 6, 2, 16
    seg = torch.full((2, L), -1)
    seg[:, :P] = 0
    if padded_prompt:
        seg[1, :7] = -1  # left padding of row 1's prompt
    for row, lengths in ((0, (20, 1, 30)), (1, (12, 44))):
        o = P
        for k, n in enumerate(lengths):
            seg[row, o : o + n] = k + 1
            o += n
    layout = attention.SharedLayout(seg, P)
    assert layout.unpadded_prompt is not padded_prompt
    assert [s[1:] for s in layout.spans()] == [(40, 20), (60, 1), (61, 30), (40, 12), (52, 44)]
    mask = shared_prefix_mask(seg)[:, :, P:]  # (2, 1, L - P, L), bool
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, L, n, d, generator=g).transpose(1, 2) for n in (heads, kv, kv))
    w = torch.randn(2, heads, L - P, d, generator=g)
    real = (seg[:, P:] > 0)[:, None, :, None]  # completion columns, not padding
    outs = []
    for split in (False, True):
        qi, ki, vi = (x.detach().clone().requires_grad_() for x in (q, k, v))
        if split:
            o = attention._CompletionAttention.apply(qi[:, :, P:], ki, vi, layout, d ** -0.5)
        else:
            o = torch.nn.functional.scaled_dot_product_attention(qi[:, :, P:], ki, vi, attn_mask=mask,
                                                                 enable_gqa=True)
        (o * w * real).sum().backward()
        outs.append([o.detach() * real, qi.grad, ki.grad, vi.grad])
    tol = rel_tol(torch.float32, L)  # softmax sums over up to L keys in another order; one merge step
    for what, a, b in zip(("out", "dq", "dk", "dv"), outs[1], outs[0]):
        assert torch.isfinite(a).all(), what
        assert_close_scaled(a, b, tol, what=f"split vs dense {what}")


def test_completion_attention_only_for_fp32_outside_autocast() -> None:
    q = torch.randn(1, 2, 3, 4)
    assert attention._split_completions(q)
    assert not attention._split_completions(q.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not attention._split_completions(q)


def test_split_completion_attention_is_chosen_where_it_was_measured_faster() -> None:
    """``SharedLayout.split_pays`` on the layouts whose times are in ``attention.SPLIT_MAX_RATIO``'s docstring: the
    split where it took 0.70-0.76 of the masked call's time, the masked call where the split took 1.00-1.31."""

    def layout(P: int, rows: list[list[int]]) -> attention.SharedLayout:
        L = P + max(sum(r) for r in rows)
        seg = torch.full((len(rows), L), -1)
        seg[:, :P] = 0
        for b, lengths in enumerate(rows):
            o = P
            for k, n in enumerate(lengths):
                seg[b, o : o + n] = k + 1
                o += n
        return attention.SharedLayout(seg, P)

    g = torch.Generator().manual_seed(0)

    def ragged(b: int, k: int) -> list[list[int]]:
        return torch.randint(10, 61, (b, k), generator=g).tolist()

    assert layout(384, [[48] * 8] * 2).split_pays()
    assert layout(384, [[48] * 8]).split_pays()
    assert layout(64, [[64] * 4] * 8).split_pays()
    assert layout(256, ragged(4, 8)).split_pays()
    assert not layout(384, [[48] * 2] * 2).split_pays()
    assert not layout(384, [[48] * 4] * 2).split_pays()
    assert not layout(384, [[24] * 4] * 2).split_pays()
    assert not layout(200, ragged(8, 4)).split_pays()
