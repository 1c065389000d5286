"""bf16 copy, 64 prompts x K=4, N new tokens: static layers (as is) vs dynamic layers with room (views)."""
import resource, sys, time
from pathlib import Path
import torch
sys.path.insert(0, "/work/main/benchmarks")
import throughput_sampling as tsamp
import exoalign.sampling as sampling
from exoalign.models import load_causal_lm, load_tokenizer
from exoalign.sampling import HFSampler, SamplingSettings
from exoalign.zoo import resolve_model_path

def main():
    modes, new_tokens, n_prompts = sys.argv[1].split(","), int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(2)
    path = resolve_model_path("smollm2")
    tok = load_tokenizer(path, padding_side="left")
    model = load_causal_lm(path, dtype="float32").eval()
    prompts = tsamp._prompt_ids(tok, n_prompts)
    real = sampling._with_room
    outs = {}
    for mode in modes:
        sampling._with_room = (lambda c, e, static: real(c, e, False)) if mode == "views" else real
        s = SamplingSettings(temperature=0.8, max_new_tokens=new_tokens, seed=0, batch_size=64, sample_dtype="bfloat16")
        sampler = HFSampler(model, tok, s)
        t = time.perf_counter()
        with torch.inference_mode():
            out = sampler.generate(prompts, list(range(n_prompts)), 4)
        dt = time.perf_counter() - t
        ids = [c.ids for g in out for c in g]
        n = sum(len(i) for i in ids)
        same = None
        if "static" in outs and mode == "views":
            same = sum(a == b for a, b in zip(outs["static"], ids))
        outs[mode] = ids
        print(mode, new_tokens, f"s {dt:.1f}", "tokens", n, "same rows as static", same, flush=True)

main()
