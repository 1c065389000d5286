"""Issue 12 item 9: ``disable_dropout`` makes training-mode log-probs equal eval-mode ones on every architecture.

OPT applies ``config.dropout`` functionally and GPTBigCode passes ``attn_pdrop`` to its attention kernel, so
zeroing ``nn.Dropout`` modules alone leaves them stochastic. Each model here is built tiny (one layer) from
its config with every dropout-like field set to 0.3, so a missed one shows as a difference of the order of
the log-probs themselves.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from exoalign.logprobs import sequence_logps
from exoalign.packing import collate_groups
from exoalign.train.setup import DROPOUT_NAME, disable_dropout

V = 96
WIDE = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
ARCHS = {
    "gpt2": dict(n_embd=32, n_layer=1, n_head=4),
    "llama": dict(WIDE, num_key_value_heads=2),
    "mistral": dict(WIDE, num_key_value_heads=2),
    "qwen2": dict(WIDE, num_key_value_heads=2),
    "gemma": dict(WIDE, num_key_value_heads=2, head_dim=8),
    "gemma2": dict(WIDE, num_key_value_heads=2, head_dim=8),
    "phi3": dict(WIDE, num_key_value_heads=2),
    "phi": dict(WIDE),
    "gpt_neox": dict(WIDE),
    "opt": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32),
    "falcon": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4),
    "bloom": dict(hidden_size=32, n_layer=1, n_head=4),
    "gpt_bigcode": dict(n_embd=32, n_layer=1, n_head=4),
    "mixtral": dict(WIDE, num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1),
    "qwen2_moe": dict(WIDE, num_key_value_heads=2, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32,
                      shared_expert_intermediate_size=32),
    "stablelm": dict(WIDE, num_key_value_heads=2),
}


def _model(model_type: str) -> torch.nn.Module:
    config = AutoConfig.for_model(model_type, vocab_size=V, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                  **ARCHS[model_type])
    for name, value in list(vars(config).items()):  # every dropout-like field on, whatever the model calls it
        if DROPOUT_NAME.search(name) and isinstance(value, (int, float)) and not isinstance(value, bool):
            setattr(config, name, 0.3)
    config._attn_implementation = "eager"  # eager attention applies its dropout probability explicitly
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def _batch() -> dict[str, torch.Tensor]:
    return collate_groups([[5, 6, 7], [8, 9]], [[[10, 11, 12], [13, 14]], [[15, 16, 17, 18], [19]]], pad_id=0)


def _logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])[0]


@pytest.mark.parametrize("model_type", sorted(ARCHS))
def test_train_mode_logps_equal_eval_mode_after_disable_dropout(model_type):
    model = _model(model_type)
    batch = _batch()
    model.eval()
    reference = _logps(model, batch)
    model.train()
    torch.manual_seed(1)
    before = _logps(model, batch)
    assert disable_dropout(model) > 0
    torch.manual_seed(2)
    after = [_logps(model, batch) for _ in range(2)]
    for lp in after:
        torch.testing.assert_close(lp, reference, rtol=0, atol=1e-5)
    # The test has teeth: with dropout on, training mode gives other numbers.
    assert (before - reference).abs().max() > 1e-3


@pytest.mark.parametrize("model_type", ["opt", "gpt_bigcode"])
def test_functional_dropout_is_caught_where_module_zeroing_is_not(model_type):
    """The two architectures of the issue: zeroing nn.Dropout modules only (the old behaviour) is not enough."""
    model = _model(model_type).train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    batch = _batch()
    torch.manual_seed(1)
    a = _logps(model, batch)
    torch.manual_seed(2)
    b = _logps(model, batch)
    assert (a - b).abs().max() > 1e-3
    disable_dropout(model)
    assert model.config.to_dict().get("attn_pdrop", 0) == 0 and model.config.to_dict().get("dropout", 0) == 0
    torch.manual_seed(1)
    a = _logps(model, batch)
    torch.manual_seed(2)
    torch.testing.assert_close(a, _logps(model, batch), rtol=0, atol=0)


def test_disable_dropout_leaves_other_numbers_alone():
    model = _model("llama")
    eps, theta = model.config.rms_norm_eps, getattr(model.config, "rope_theta", None)
    disable_dropout(model)
    assert model.config.rms_norm_eps == eps and getattr(model.config, "rope_theta", None) == theta
    assert model.config.attention_dropout == 0
