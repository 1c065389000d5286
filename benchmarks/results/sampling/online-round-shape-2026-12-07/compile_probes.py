"""Probes: the bf16 copy's sampler calls at the online-round shape (3 prompts × K = 4, 24 new tokens, one thread),
timed after two warm calls (which do any compiling).

* ``eager``            the code as it is;
* ``pieces``           Llama's RMSNorm and the MLP's ``silu(g) * u`` compiled by torch.compile (dynamic shapes),
                       the products left as they are (12 timed calls);
* ``layers``           every decoder layer of the copy compiled (``nn.Module.compile(dynamic=True)``): dynamo stops
                       at the copy's packed oneDNN weights;
* ``layers-unpacked``  the same with plain bf16 linears (``pack_linears`` off) (8 timed calls).

    python compile_probes.py eager|pieces|layers|layers-unpacked
"""

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.models.llama import modeling_llama as ml

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # benchmarks/
import throughput_sampling as tsamp  # noqa: E402

import exoalign.sampling as sampling  # noqa: E402
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


if mode == "pieces":
    crms = torch.compile(rms, dynamic=True)
    csm = torch.compile(silu_mul, dynamic=True)
    ml.LlamaRMSNorm.forward = lambda self, x: crms(x, self.weight, self.variance_epsilon)
    ml.LlamaMLP.forward = lambda self, x: self.down_proj(csm(self.gate_proj(x), self.up_proj(x)))
elif mode.startswith("layers"):
    if mode == "layers-unpacked":
        sampling.pack_linears = lambda model: 0
    real = sampling.sampling_copy

    def compiled_copy(model: torch.nn.Module, dtype: str) -> torch.nn.Module:
        twin = real(model, dtype)
        for layer in twin.model.layers:
            layer.compile(dynamic=True)
        return twin

    sampling.sampling_copy = compiled_copy

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
    for i in range(2, 10 if mode.startswith("layers") else 14):
        t = time.perf_counter()
        sampler.generate(prompts[3 * i : 3 * i + 3], [3 * i, 3 * i + 1, 3 * i + 2], 4)
        times.append(time.perf_counter() - t)
    print(mode, "calls", " ".join(f"{x:.3f}" for x in times), "median", round(sorted(times)[len(times) // 2], 3))
