"""The fp32 SmolLM2 pair step as benchmarks/throughput.py's ``exoalign`` system and ``--profile`` set it up, for the
probes in this folder: 8 pairs, prompts 64 and completions 64 tokens, prompt sharing, lean activations, the
training attention, fused AdamW. Run from the repository root with ``OMP_WAIT_POLICY=PASSIVE``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP, as the CLI sets it

import torch  # noqa: E402
from throughput_systems import SMOLLM2, Shape, compute_loss_fn, pair_batch  # noqa: E402

from exoalign.attention import training_attention  # noqa: E402
from exoalign.hardware import keep_freed_memory  # noqa: E402
from exoalign.lean import apply_lean_activations  # noqa: E402
from exoalign.logprobs import autocast, logits_grad_in_place  # noqa: E402
from exoalign.models import load_causal_lm, own_trainable_weights  # noqa: E402
from exoalign.zoo import resolve_model_path  # noqa: E402


def setup(threads: int = 2):
    """(model, ``fwd_bwd``, ``step``) for SmolLM2-135M-Instruct's weights: ``fwd_bwd()`` leaves the gradients in
    the parameters; ``step()`` is a whole training step (clip, fused AdamW, gradients cleared)."""
    torch.set_num_threads(threads)
    keep_freed_memory(device="cpu")
    model = load_causal_lm(resolve_model_path("smollm2"))
    model.train()
    own_trainable_weights(model)
    apply_lean_activations(model)
    batch, cfg = pair_batch(Shape(**SMOLLM2))
    fn = compute_loss_fn(True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)

    def fwd_bwd() -> torch.Tensor:
        with training_attention():
            with autocast("no", "cpu"), logits_grad_in_place():
                loss, _ = fn(model, batch, cfg)
            loss.backward()
        return loss.detach()

    def step() -> None:
        fwd_bwd()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, fwd_bwd, step
