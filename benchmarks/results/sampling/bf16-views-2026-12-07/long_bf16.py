"""One sampler call of PROMPTS chat prompts × K = 4, up to N new tokens, from SmolLM2's bf16 sampling copy (2
threads): ``static`` = the code as it is (static layers), ``views`` = ``sampling._with_room(static=False)`` forced
(the fp32 path's views of the filled columns). Seconds, tokens, and rows equal to the last ``static`` run's.

    python long_bf16.py views,static,views,static 160 64
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


def main() -> None:
    modes, new_tokens, n_prompts = sys.argv[1].split(","), int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(2)
    path = resolve_model_path("smollm2")
    tok = load_tokenizer(path, padding_side="left")
    model = load_causal_lm(path, dtype="float32").eval()
    prompts = tsamp._prompt_ids(tok, n_prompts)
    real = sampling._with_room
    outs: dict[str, list] = {}
    for mode in modes:
        sampling._with_room = (lambda c, e, static: real(c, e, False)) if mode == "views" else real
        s = SamplingSettings(temperature=0.8, max_new_tokens=new_tokens, seed=0, batch_size=64,
                             sample_dtype="bfloat16")
        sampler = HFSampler(model, tok, s)
        t = time.perf_counter()
        with torch.inference_mode():
            out = sampler.generate(prompts, list(range(n_prompts)), 4)
        dt = time.perf_counter() - t
        ids = [c.ids for g in out for c in g]
        same = sum(a == b for a, b in zip(outs["static"], ids)) if "static" in outs and mode == "views" else None
        outs[mode] = ids
        print(mode, new_tokens, f"s {dt:.1f}", "tokens", sum(len(i) for i in ids), "same rows as static", same,
              flush=True)


if __name__ == "__main__":
    main()
