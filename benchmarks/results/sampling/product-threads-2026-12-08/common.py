"""What the probes of this folder share: a timing loop, and SmolLM2's bf16 sampler at a given shape."""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # benchmarks/


def bench(f, n=200):
    """Median of 5 rounds of ``n`` calls of ``f`` after 20 warm-up calls, µs a call."""
    for _ in range(20):
        f()
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            f()
        ts.append((time.perf_counter() - t) / n)
    return sorted(ts)[2] * 1e6


def bf16_sampler(prompts_per_call: int, calls: int, new_tokens: int, threads: int):
    """``(sampler, prompts)``: SmolLM2 sampled from its bf16 copy (temperature 0.8, ``min_new_tokens`` 1, seed 0),
    the benchmark's distinct chat prompts, torch on ``threads`` threads; warmed up by one call of one prompt."""
    import throughput_sampling as tsamp

    from exoalign.models import load_causal_lm, load_tokenizer
    from exoalign.sampling import HFSampler, SamplingSettings
    from exoalign.zoo import resolve_model_path

    torch.set_num_threads(threads)
    path = resolve_model_path("smollm2")
    tok = load_tokenizer(path, padding_side="left")
    model = load_causal_lm(path, dtype="float32").eval()
    prompts = tsamp._prompt_ids(tok, prompts_per_call * calls)
    s = SamplingSettings(temperature=0.8, max_new_tokens=new_tokens, min_new_tokens=1, seed=0,
                         batch_size=prompts_per_call, sample_dtype="bfloat16")
    sampler = HFSampler(model, tok, s)
    with torch.inference_mode():
        sampler.generate(prompts[:1], [0], 4)  # the bf16 copy, kernels
    return sampler, prompts
