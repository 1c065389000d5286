"""CUDA checks (run by benchmarks/gpu_check.sh; skipped without a GPU): bf16 vs fp32, prompt sharing with SDPA,
the chunked head, determinism."""

from __future__ import annotations

import pytest
import torch

from exoalign.logprobs import autocast, head_mode
from exoalign.models import build_model, tiny_config
from exoalign.packing import collate_groups, group_logps, supports_shared_prefix
from exoalign.train.config import LossConfig
from exoalign.train.step import compute_loss

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
VOCAB = 257
#: bf16 autocast against fp32: summed log-probs of ~10 tokens within this (nats), losses within LOSS_TOL.
LOGP_TOL, LOSS_TOL = 0.25, 0.02


def _model(seed: int = 0) -> torch.nn.Module:
    config = tiny_config(VOCAB, model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=1, bos_token_id=0,
                         eos_token_id=0)
    config._attn_implementation = "sdpa"
    return build_model(config, seed=seed).cuda()


def _batch(seed: int = 3, k: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(2, VOCAB, (n,), generator=g).tolist()

    batch = collate_groups([ids(9), ids(4)], [[ids(3 + j) for j in range(k)], [ids(6 - j) for j in range(k)]],
                           pad_id=1, device="cuda")
    batch["rewards"] = torch.randn(2, k, generator=g).cuda()
    batch["ref_logps"] = torch.full((2, k), -40.0, device="cuda")
    return batch


def _trajectory(precision: str, steps: int = 5) -> list[float]:
    torch.manual_seed(0)
    model, batch = _model(), _batch()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    cfg = LossConfig(name="exo", target="rw", beta_pi=0.1, beta_r=0.1)
    losses = []
    for _ in range(steps):
        with autocast(precision, "cuda"):
            loss, _ = compute_loss(model, batch, cfg, prefix_sharing=True)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def test_bf16_autocast_matches_fp32_within_tolerance():
    model, batch = _model(), _batch()
    with torch.no_grad():
        fp32, _ = group_logps(model, batch)
        with autocast("bf16", "cuda"):
            bf16, _ = group_logps(model, batch)
    assert float((bf16 - fp32).abs().max()) < LOGP_TOL
    a, b = _trajectory("fp32"), _trajectory("bf16")
    assert a == pytest.approx(b, abs=LOSS_TOL)
    assert a[-1] < a[0]  # the steps train


def test_prefix_sharing_on_cuda_with_sdpa_is_exact():
    model, batch = _model(), _batch(k=4)
    assert supports_shared_prefix(model)
    with torch.no_grad():
        plain, n_plain = group_logps(model, batch, prefix_sharing=False)
        shared, n_shared = group_logps(model, batch, prefix_sharing=True)
    torch.testing.assert_close(shared, plain, rtol=0, atol=1e-4)
    assert torch.equal(n_shared, n_plain)


def test_chunked_head_on_cuda_equals_plain():
    model, batch = _model(), _batch()
    out = []
    for mode in ("off", "on"):
        model.zero_grad(set_to_none=True)
        with head_mode(mode):
            lp, _ = group_logps(model, batch, prefix_sharing=True)
        lp.sum().backward()
        out.append((lp.detach(), model.model.embed_tokens.weight.grad.clone()))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=0, atol=1e-4)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-3, atol=1e-5)


def test_training_is_deterministic_on_cuda():
    assert _trajectory("fp32", steps=3) == _trajectory("fp32", steps=3)
