"""Probe: the bf16 copy's sampler calls at the online-round shape (3 prompts × K = 4, 24 new tokens, one thread),
eager or with Llama's RMSNorm and the MLP's ``silu(g) * u`` each compiled by torch.compile (dynamic shapes), the
products left as they are. Two warm calls (the compiling), then 12 timed calls.

    python compiled_pieces.py eager|compiled
"""

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.models.llama import modeling_llama as ml

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # benchmarks/
import throughput_sampling as tsamp  # noqa: E402

from exoalign.models import load_causal_lm, load_tokenizer  # noqa: E402
from exoalign.sampling import HFSampler, SamplingSettings  # noqa: E402
from exoalign.zoo import resolve_model_path  # noqa: E402

torch.set_num_threads(1)
mode = sys.argv[1]


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    dt = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(dt)


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(g) * u


if mode == "compiled":
    crms = torch.compile(rms, dynamic=True)
    csm = torch.compile(silu_mul, dynamic=True)
    ml.LlamaRMSNorm.forward = lambda self, x: crms(x, self.weight, self.variance_epsilon)
    ml.LlamaMLP.forward = lambda self, x: self.down_proj(csm(self.gate_proj(x), self.up_proj(x)))

path = resolve_model_path("smollm2")
tok = load_tokenizer(path, padding_side="left")
model = load_causal_lm(path, dtype="float32").eval()
prompts = tsamp._prompt_ids(tok, 48)
s = SamplingSettings(temperature=0.8, max_new_tokens=24, seed=0, batch_size=3, sample_dtype="bfloat16")
sampler = HFSampler(model, tok, s)
with torch.inference_mode():
    t = time.perf_counter()
    sampler.generate(prompts[:3], [0, 1, 2], 4)
    sampler.generate(prompts[3:6], [3, 4, 5], 4)
    print(mode, "first two calls", round(time.perf_counter() - t, 2), flush=True)
    times = []
    for i in range(2, 14):
        t = time.perf_counter()
        sampler.generate(prompts[3 * i : 3 * i + 3], [3 * i, 3 * i + 1, 3 * i + 2], 4)
        times.append(time.perf_counter() - t)
    print(mode, "calls", " ".join(f"{x:.3f}" for x in times), "median", round(sorted(times)[len(times) // 2], 3))
