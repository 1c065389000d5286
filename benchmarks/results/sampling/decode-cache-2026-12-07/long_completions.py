"""One sampler call of 64 chat prompts × K = 4 with up to N new tokens on SmolLM2 (2 threads): seconds, tokens and
peak RSS. ``dyn`` runs the fp32 decode on transformers' dynamic cache (the code before the cache with room, by
returning the fp32 cache as it is from ``sampling._with_room``; at the runs' code the cache with room was
``sampling._growing``, since merged into ``_with_room(static=False)``); ``grow`` runs the code as it is.

    PYTHONPATH=<tree> python long_completions.py dyn|grow N model|bfloat16
"""

import resource
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


def main() -> None:
    mode, new_tokens, dtype = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(2)
    path = resolve_model_path("smollm2")
    tok = load_tokenizer(path, padding_side="left")
    model = load_causal_lm(path, dtype="float32").eval()
    prompts = tsamp._prompt_ids(tok, 64)
    if mode == "dyn":
        real = sampling._with_room
        sampling._with_room = lambda cache, extra, static: real(cache, extra, static) if static else cache
    s = SamplingSettings(temperature=0.8, max_new_tokens=new_tokens, seed=0, batch_size=64, sample_dtype=dtype)
    sampler = HFSampler(model, tok, s)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    with torch.inference_mode():
        out = sampler.generate(prompts, list(range(64)), 4)
    n = sum(len(c.ids) for g in out for c in g)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(sys.argv[1:], f"s {time.perf_counter() - t:.1f}", "tokens", n,
          "max len", max(len(c.ids) for g in out for c in g), f"maxrss MB before {before:.0f} after {after:.0f}")


if __name__ == "__main__":
    main()
