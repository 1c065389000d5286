"""Issue 12 item 12: prompt sharing for sliding-window models, and Bloom's fallback decision matching its code."""

from __future__ import annotations

import pytest
import torch
from numerics import assert_close_scaled, rel_tol
from transformers import AutoConfig, AutoModelForCausalLM

from exoalign.logprobs import sequence_logps
from exoalign.packing import (
    _shared_logps,
    collate_groups,
    shared_prefix_logps,
    sliding_window,
    supports_shared_prefix,
)

V = 96
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)
WINDOWED = {
    "mistral": dict(SMALL),
    "gemma2": dict(SMALL, head_dim=8),
    "gemma3_text": dict(SMALL, head_dim=8),
}


def _model(model_type: str, **kw) -> torch.nn.Module:
    config = AutoConfig.for_model(model_type, vocab_size=V, pad_token_id=0, bos_token_id=1, eos_token_id=2, **kw)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _batch() -> dict[str, torch.Tensor]:
    """Two groups, K = 2, widths P = 4 and C = 6: each unshared sequence is at most 10 tokens."""
    prompts = [[5, 6, 7, 8], [9, 10]]
    completions = [[[11, 12, 13, 14, 15, 16], [17, 18]], [[19, 20, 21], [22, 23, 24, 25, 26]]]
    return collate_groups(prompts, completions, pad_id=0)


def _unshared(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])[0].view(2, 2)


@pytest.mark.parametrize("model_type", sorted(WINDOWED))
def test_sliding_window_models_share_when_the_data_fits_the_window(model_type):
    model = _model(model_type, **WINDOWED[model_type])
    assert sliding_window(model) == model.config.sliding_window and model.config.sliding_window >= 10
    assert supports_shared_prefix(model)  # no longer ruled out by the window alone
    batch = _batch()
    with torch.no_grad():
        shared = _shared_logps(model, batch, 1.0)[0]
        used = shared_prefix_logps(model, batch)[0]
    plain = _unshared(model, batch)
    # the same fp32 model in two layouts: rounding of reductions over the vocabulary, relative to the largest value
    assert_close_scaled(shared, plain, rel_tol(torch.float32, model.config.vocab_size), what="shared vs plain")
    torch.testing.assert_close(used, shared, rtol=0, atol=0)  # the shared path is the one taken


@pytest.mark.parametrize("model_type", sorted(WINDOWED))
def test_a_batch_longer_than_the_window_falls_back(model_type):
    """With a window of 6 the 10-token sequences are windowed: the shared layout (which has no window) would
    give other numbers, so shared_prefix_logps must take the unshared layout for this batch."""
    model = _model(model_type, **WINDOWED[model_type], sliding_window=6)
    batch = _batch()
    plain = _unshared(model, batch)
    with torch.no_grad():
        forced = _shared_logps(model, batch, 1.0)[0]
        got = shared_prefix_logps(model, batch)[0]
    assert (forced - plain).abs().max() > 1e-4  # the window really matters here
    torch.testing.assert_close(got, plain, rtol=0, atol=0)  # the unshared layout itself: the same computation


@pytest.mark.parametrize(("model_type", "kw"), [
    ("bloom", dict(hidden_size=32, n_layer=1, n_head=4)),
    ("falcon", dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, alibi=True)),
])
def test_alibi_models_fall_back_and_the_shared_path_refuses_them_by_the_same_rule(model_type, kw):
    model = _model(model_type, **kw)
    batch = _batch()
    assert not supports_shared_prefix(model)
    with torch.no_grad():
        got = shared_prefix_logps(model, batch)[0]
    torch.testing.assert_close(got, _unshared(model, batch), rtol=0, atol=0)
    with pytest.raises(ValueError, match="ALiBi"):  # not "too many values to unpack" from inside the model
        _shared_logps(model, batch, 1.0)
