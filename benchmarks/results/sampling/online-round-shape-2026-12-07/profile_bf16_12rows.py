"""One sampler call at the default demo's online-round shape (3 chat prompts × K = 4, 24 new tokens, one thread),
from SmolLM2's bf16 sampling copy (or ``model`` for fp32), after two warm calls: its time, then a torch.profiler
table of a third call.

    python profile_bf16_12rows.py bfloat16|model
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # benchmarks/
import throughput_sampling as tsamp  # noqa: E402

from exoalign.models import load_causal_lm, load_tokenizer  # noqa: E402
from exoalign.sampling import HFSampler, SamplingSettings  # noqa: E402
from exoalign.zoo import resolve_model_path  # noqa: E402

torch.set_num_threads(1)
path = resolve_model_path("smollm2")
tok = load_tokenizer(path, padding_side="left")
model = load_causal_lm(path, dtype="float32").eval()
prompts = tsamp._prompt_ids(tok, 12)
s = SamplingSettings(temperature=0.8, max_new_tokens=24, seed=0, batch_size=3, sample_dtype=sys.argv[1])
sampler = HFSampler(model, tok, s)
with torch.inference_mode():
    sampler.generate(prompts[:3], [0, 1, 2], 4)
    t = time.perf_counter()
    sampler.generate(prompts[3:6], [3, 4, 5], 4)
    print("one call", time.perf_counter() - t)
    with torch.profiler.profile() as prof:
        sampler.generate(prompts[6:9], [6, 7, 8], 4)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
