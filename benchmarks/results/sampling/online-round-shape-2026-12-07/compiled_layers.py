"""Probe: the bf16 copy's sampler calls at the online-round shape (3 prompts × K = 4, 24 new tokens, one thread) with
every decoder layer of the copy compiled (``nn.Module.compile(dynamic=True)``). With the copy's packed linears
(``pack``) dynamo stops at the opaque oneDNN weight; ``unpacked`` compiles the copy with plain bf16 linears.

    python compiled_layers.py pack|unpacked
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # benchmarks/
import throughput_sampling as tsamp  # noqa: E402

import exoalign.sampling as sampling  # noqa: E402
from exoalign.models import load_causal_lm, load_tokenizer  # noqa: E402
from exoalign.sampling import HFSampler, SamplingSettings  # noqa: E402
from exoalign.zoo import resolve_model_path  # noqa: E402

torch.set_num_threads(1)
if sys.argv[1] == "unpacked":
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
    print(sys.argv[1], "first two calls", round(time.perf_counter() - t, 2), flush=True)
    times = []
    for i in range(2, 10):
        t = time.perf_counter()
        sampler.generate(prompts[3 * i : 3 * i + 3], [3 * i, 3 * i + 1, 3 * i + 2], 4)
        times.append(time.perf_counter() - t)
    print(sys.argv[1], "calls", " ".join(f"{x:.3f}" for x in times), "median", round(sorted(times)[len(times) // 2], 3))
