"""train.compile: the inductor-compiled model gives the eager log-probs and gradients; failures fall back."""

from __future__ import annotations

import logging

import pytest
import torch
from numerics import assert_close_scaled, rel_tol

from exoalign.logprobs import sequence_logps
from exoalign.models import build_model, tiny_config
from exoalign.packing import collate_groups
from exoalign.train.step import compile_model, compiled_modules, eager_fallback, repeated_blocks

VOCAB = 61


def _model() -> torch.nn.Module:
    return build_model(tiny_config(VOCAB, n_layer=1, n_embd=32, n_head=2, pad_token_id=1, bos_token_id=0,
                                   eos_token_id=0), seed=0)


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)

    def ids(n: int) -> list[int]:
        return torch.randint(2, VOCAB, (n,), generator=g).tolist()

    return collate_groups([ids(5), ids(3)], [[ids(4), ids(2)], [ids(3), ids(1)]], pad_id=1)


def _logps_and_grads(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    lp, _ = eager_fallback(model, lambda: sequence_logps(model, batch["input_ids"], batch["attention_mask"],
                                                           batch["labels"], temperature=0.9))
    (lp * torch.tensor([1.0, -1.5, 0.5, 2.0])).sum().backward()
    return lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
def test_compiled_equals_eager_to_1e5() -> None:
    """Inductor on CPU (gcc): ~1-3 min of compiling on a loaded 2-core machine, hence slow."""
    model, batch = _model(), _batch()
    lp_eager, g_eager = _logps_and_grads(model, batch)
    assert compile_model(model)
    lp_comp, g_comp = _logps_and_grads(model, batch)
    assert compiled_modules(model) == repeated_blocks(model) != []  # its blocks, still compiled: no silent fallback
    # inductor fuses and reorders fp32 reductions (the vocabulary's among them): rounding relative to each scale
    tol = rel_tol(torch.float32, model.config.vocab_size)
    assert_close_scaled(lp_comp, lp_eager, tol, what="log-probs")
    assert_close_scaled(g_comp, g_eager, tol, what="grad")


def test_failing_compiler_falls_back_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler here")

    model, batch = _model(), _batch()
    lp_eager, g_eager = _logps_and_grads(model, batch)
    assert compile_model(model, backend=broken_backend)
    # the decoder blocks are compiled one by one (one graph for all of them), not the model as a whole
    assert compiled_modules(model) == repeated_blocks(model) == list(model.transformer.h)
    with caplog.at_level(logging.WARNING, logger="exoalign.train.step"):
        lp, grads = _logps_and_grads(model, batch)
        lp2, _ = _logps_and_grads(model, batch)
    warnings = [r for r in caplog.records if "train.compile" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
    assert compiled_modules(model) == []
    # the fallback is the eager model itself: the very same computation, bit for bit
    torch.testing.assert_close(lp, lp_eager, rtol=0, atol=0)
    torch.testing.assert_close(lp2, lp_eager, rtol=0, atol=0)
    assert_close_scaled(grads, g_eager, 0.0, what="grad")


def test_non_compile_errors_are_not_swallowed() -> None:
    model = _model()
    assert compile_model(model, backend="eager")

    def boom():
        raise ValueError("a real bug")

    with pytest.raises(ValueError, match="a real bug"):
        eager_fallback(model, boom)


def test_a_model_without_named_blocks_is_compiled_whole() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
    assert repeated_blocks(net) == []
    assert compile_model(net, backend="eager")
    assert compiled_modules(net) == [net]
    x = torch.randn(2, 3)
    torch.testing.assert_close(eager_fallback(net, lambda: net(x)), torch.relu(net[0](x)), rtol=0, atol=0)
