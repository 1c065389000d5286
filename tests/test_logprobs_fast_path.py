"""The fast unshared path of exoalign.logprobs: same numbers as the naive computation, less work and memory."""

from __future__ import annotations

import pytest
import torch
from numerics import assert_close_scaled, rel_tol

from exoalign.logprobs import (
    chunked_head_supported,
    compact_logits_supported,
    gathered_token_logps,
    sequence_logps,
    token_logps,
)
from exoalign.models import build_model, tiny_config
from exoalign.packing import collate_groups

VOCAB = 64


@pytest.fixture()
def model() -> torch.nn.Module:
    config = tiny_config(VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    model = build_model(config, seed=0)
    chunked_head_supported(model)  # its one-off probe runs the model on 3 tokens: done before any hook counts
    return model


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)

    def ids(n: int) -> list[int]:
        return torch.randint(2, VOCAB, (n,), generator=g).tolist()

    return collate_groups([ids(6), ids(2)], [[ids(5), ids(3)], [ids(1), ids(4)]], pad_id=1)


@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_token_logps_values_and_gradients_match_log_softmax(temperature: float) -> None:
    torch.manual_seed(0)
    logits = (torch.randn(37, 50) * 5).requires_grad_()
    tgt = torch.randint(0, 50, (37,))
    w = torch.randn(37)
    ref = (logits / temperature).log_softmax(-1).gather(-1, tgt[:, None]).squeeze(-1)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), logits)
    out = token_logps(logits, tgt, temperature, chunk=8)  # several chunks, the last one partial
    (g_out,) = torch.autograd.grad((out * w).sum(), logits)
    tol = rel_tol(torch.float32, 50)  # fp32 log-sum-exp over 50 logits in chunks: another summation order
    assert_close_scaled(out, ref, tol, what="values")
    assert_close_scaled(g_out, g_ref, tol, what="gradient")


def test_row_logsumexp_equals_torchs() -> None:
    """The fused-kernel log-sum-exp of the token log-probs' forward: torch.logsumexp's values on a row count that is
    not a multiple of its row group, with large logits, rows holding -inf entries and a row of -inf only."""
    from exoalign.logprobs import _LSE_ROWS, _row_logsumexp

    g = torch.Generator().manual_seed(4)
    V = 3000
    x = torch.randn(2 * _LSE_ROWS + 5, V, generator=g) * 8 + 40
    x[3, ::7] = float("-inf")
    x[7] = float("-inf")
    ref = torch.logsumexp(x, -1)
    out = _row_logsumexp(x)
    assert out[7] == float("-inf") and torch.isfinite(out[torch.arange(x.shape[0]) != 7]).all()
    # fp32 sums of V exponentials in another order, relative to the row's value (the max is exact in both)
    keep = torch.isfinite(ref)
    assert_close_scaled(out[keep], ref[keep], rel_tol(torch.float32, V), what="logsumexp")
    wrong = x.clone()
    wrong[0, 0] += 50.0  # a changed logit moves its row: the check can fail
    assert not torch.allclose(_row_logsumexp(wrong)[0], ref[0], rtol=1e-4)


def test_gathered_rows_read_twice() -> None:
    """Row 0 predicts two tokens (prompt sharing's first completion tokens): values and summed gradients."""
    torch.manual_seed(1)
    logits = torch.randn(4, 11, requires_grad=True)
    index, tgt = torch.tensor([0, 0, 1, 3, 0]), torch.tensor([2, 5, 7, 1, 2])
    w = torch.tensor([1.0, -2.0, 0.5, 3.0, 1.5])
    ref = logits.log_softmax(-1)[index, tgt]
    (g_ref,) = torch.autograd.grad((ref * w).sum(), logits)
    out = gathered_token_logps(logits, index, tgt, 1.0)
    (g_out,) = torch.autograd.grad((out * w).sum(), logits)
    tol = rel_tol(torch.float32, 11)  # fp32 log-sum-exp over 11 logits
    assert_close_scaled(out, ref, tol, what="values")
    assert_close_scaled(g_out, g_ref, tol, what="gradient")
    assert float(g_out[2].abs().sum()) == 0.0  # an unread row gets no gradient


def test_bf16_logits_keep_no_fp32_copy_for_backward() -> None:
    """For bf16 logits only the logits themselves and per-token scalars are saved: no [N, V] fp32 copy."""
    logits = torch.randn(64, 1000, dtype=torch.bfloat16, requires_grad=True)
    tgt = torch.randint(0, 1000, (64,))
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = token_logps(logits, tgt)
    big = [t for t in saved if t.numel() >= logits.numel()]
    assert len(big) == 1 and big[0].dtype == torch.bfloat16 and big[0].data_ptr() == logits.data_ptr()
    assert out.dtype == torch.float32
    out.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    ref = logits.detach().float().log_softmax(-1).gather(-1, tgt[:, None]).squeeze(-1)
    # both read the same bf16 logits; ours accumulates the log-sum-exp over 1000 terms in fp32 in another order
    assert_close_scaled(out.detach(), ref, rel_tol(torch.float32, 1000), what="bf16 logits")


def test_sequence_logps_matches_rows_alone(model: torch.nn.Module) -> None:
    b = batch()
    lp, n = sequence_logps(model, b["input_ids"], b["attention_mask"], b["labels"], temperature=0.7)
    for r in range(len(lp)):
        keep = b["attention_mask"][r].bool()
        ids, lab = b["input_ids"][r][keep], b["labels"][r][keep]
        logp = (model(ids[None]).logits[0, :-1] / 0.7).log_softmax(-1)
        t = lab[1:]
        m = t != -100
        assert int(n[r]) == int(m.sum())
        # the row alone runs other shapes: fp32 rounding over the vocabulary, relative to the value
        assert_close_scaled(lp[r], logp[m].gather(-1, t[m, None]).sum(), rel_tol(torch.float32, VOCAB), what=f"row {r}")


def test_logits_only_where_a_completion_token_is_predicted(model: torch.nn.Module) -> None:
    """The LM head sees exactly one row per labelled token (13 here), not B × T positions."""
    assert compact_logits_supported(model)
    b = batch()
    rows: list[int] = []
    handle = model.lm_head.register_forward_hook(lambda m, i, o: rows.append(i[0].reshape(-1, i[0].shape[-1]).shape[0]))
    sequence_logps(model, b["input_ids"], b["attention_mask"], b["labels"])
    handle.remove()
    assert rows == [int((b["labels"] != -100).sum())] == [5 + 3 + 1 + 4]


def test_padding_columns_are_dropped(model: torch.nn.Module) -> None:
    """Extra all-padding columns on either side change neither the numbers nor the width the model runs on."""
    b = batch()
    T = b["input_ids"].shape[1]
    widths: list[int] = []
    handle = model.transformer.wte.register_forward_hook(lambda m, i, o: widths.append(i[0].shape[1]))
    lp, n = sequence_logps(model, b["input_ids"], b["attention_mask"], b["labels"])

    def pad(x: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(x, (3, 4), value=value)

    lp2, n2 = sequence_logps(model, pad(b["input_ids"], 1), pad(b["attention_mask"], 0), pad(b["labels"], -100))
    handle.remove()
    assert widths == [T, T]
    torch.testing.assert_close(lp2, lp, rtol=0, atol=0)  # the padding is dropped: the very same computation
    assert n2.tolist() == n.tolist()


def test_models_without_mask_logits_to_keep(model: torch.nn.Module) -> None:
    """A model whose forward knows no ``logits_to_keep`` gets the same numbers through the fallback."""
    b = batch()
    expected, _ = sequence_logps(model, b["input_ids"], b["attention_mask"], b["labels"])

    class Plain(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    wrapped = Plain(model)
    assert not compact_logits_supported(wrapped)
    got, _ = sequence_logps(wrapped, b["input_ids"], b["attention_mask"], b["labels"])
    # full logits then a gather vs logits of the kept rows only: other matmul shapes, fp32 rounding
    assert_close_scaled(got, expected, rel_tol(torch.float32, VOCAB), what="fallback")
