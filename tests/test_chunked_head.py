"""The chunked LM head: log-probs from hidden states equal the plain logits path, values and gradients."""

from __future__ import annotations

import pytest
import torch
from numerics import EPS, assert_close_scaled, rel_tol

from exoalign.logprobs import chunked_head_supported, head_mode, head_token_logps, sequence_logps
from exoalign.models import build_model, tiny_config
from exoalign.packing import collate_groups, group_logps

VOCAB = 97


def _batch(seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(2, VOCAB, (n,), generator=g).tolist()

    return collate_groups([ids(6), ids(3)], [[ids(5), ids(2)], [ids(1), ids(4)]], pad_id=1)


@pytest.mark.parametrize("temperature, with_bias", [(1.0, False), (0.8, True)])
def test_head_logps_match_log_softmax(temperature: float, with_bias: bool) -> None:
    """Values and the gradients of h, W and b, with repeated rows and chunks of 3 (the last one partial)."""
    torch.manual_seed(0)
    h = torch.randn(10, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(VOCAB, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(VOCAB, dtype=torch.float64, requires_grad=True) if with_bias else None
    index = torch.tensor([0, 0, 1, 3, 9, 9, 9, 4])
    tgt = torch.randint(0, VOCAB, (8,))
    weights = torch.randn(8, dtype=torch.float64)
    logits = h @ w.t() + (b if b is not None else 0)
    ref = (logits / temperature).log_softmax(-1)[index, tgt]
    params = [h, w] + ([b] if b is not None else [])
    g_ref = torch.autograd.grad((ref * weights).sum(), params)
    out = head_token_logps(h, w, tgt, bias=b, index=index, temperature=temperature, chunk=3)
    g_out = torch.autograd.grad((out.double() * weights).sum(), params)
    assert out.dtype == torch.float32
    # the head computes in fp64 here but keeps lse and its output in fp32: rounding of an fp32 value (EPS/2)
    # accumulated over the vocabulary's terms, relative to the largest value
    tol = rel_tol(torch.float32, VOCAB)
    assert_close_scaled(out.double(), ref, tol, what="head log-probs")
    for name, a, r in zip("hwb", g_out, g_ref):
        assert_close_scaled(a, r, tol, what=f"grad {name}")
    assert float(g_out[0][2].abs().sum()) == 0.0  # a hidden row no token reads gets no gradient


def test_head_logps_bf16_autocast_close_to_fp32() -> None:
    torch.manual_seed(1)
    h = torch.randn(12, 32, requires_grad=True)
    w = (torch.randn(VOCAB, 32) * 0.3).requires_grad_()
    tgt = torch.randint(0, VOCAB, (12,))
    ref = (h @ w.t()).log_softmax(-1)[torch.arange(12), tgt]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head_token_logps(h, w, tgt, chunk=5)
    out.sum().backward()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    # bf16 matmul inputs (u = 2^-8 relative) under an fp32 log-sum-exp: within 2u of the largest |log-prob|
    assert_close_scaled(out, ref.detach(), EPS[torch.bfloat16], what="bf16 head")
    assert float((out - ref).detach().abs().max()) > 0  # bf16 really ran


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
@pytest.mark.parametrize("sharing", [False, True])
def test_model_path_equal_with_and_without_chunked_head(model_type: str, sharing: bool) -> None:
    """sequence/group log-probs and every parameter gradient (tied embeddings included) are the same."""
    extra = {} if model_type == "gpt2" else dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                   num_attention_heads=2, num_key_value_heads=1)
    model = build_model(tiny_config(VOCAB, model_type=model_type, pad_token_id=1, **extra), seed=0)
    assert chunked_head_supported(model)
    batch = _batch()
    results = []
    for mode in ("off", "on"):
        model.zero_grad(set_to_none=True)
        with head_mode(mode):
            lp, lengths = group_logps(model, batch, temperature=0.9, prefix_sharing=sharing)  # (B, K)
        (lp * torch.tensor([[1.0, -2.0], [0.5, 3.0]])).sum().backward()
        results.append((lp.detach(), lengths, _grads(model)))
    (lp_off, len_off, g_off), (lp_on, len_on, g_on) = results
    assert_close_scaled(lp_on, lp_off, rel_tol(torch.float32, VOCAB), what="log-probs")
    assert torch.equal(len_on, len_off)
    assert g_on.keys() == g_off.keys() and len(g_on) > 4
    # fp32 backward through 2 layers, reductions of length <= 97 (vocab) and 22 (tokens) taken in another order
    # by the chunked head: each gradient within rel_tol(fp32, 97) ~ 2e-5 of its own largest element.
    assert_close_scaled(g_on, g_off, rel_tol(torch.float32, VOCAB), what="grad")


def test_auto_projects_in_chunks_without_gradients_and_skips_the_head_module() -> None:
    """Under no_grad ``auto`` never calls the model's lm_head; with gradients at this size it does."""
    model = build_model(tiny_config(VOCAB, pad_token_id=1), seed=0)
    assert chunked_head_supported(model)  # the one-off probe runs the head itself
    calls = []
    model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    batch = _batch()
    with torch.no_grad():
        a, _ = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert calls == []
    b, _ = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert len(calls) == 1
    assert_close_scaled(a, b.detach(), rel_tol(torch.float32, VOCAB), what="chunked vs module head")


def test_logit_softcapping_models_keep_their_own_head() -> None:
    config = tiny_config(VOCAB, pad_token_id=1)
    config.final_logit_softcapping = 30.0
    assert not chunked_head_supported(build_model(config, seed=0))
