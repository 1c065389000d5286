"""Sampling speed of ``exoalign sample``'s samplers on SmolLM2-135M-Instruct: completion tokens/s vs batch size.

Times :class:`exoalign.sampling.HFSampler` (the code ``exoalign sample`` runs) on chat prompts, K = 4
completions per prompt, ``max_new_tokens`` 48 (``min_new_tokens`` 48 by default, so every row generates the
same number of tokens and the figure is not flattered by early EOS), for each setting of
``--batch-sizes`` (rows = prompts × K), ``--dtypes`` and ``--caches``; with ``--backends hf,vllm`` (GPU) also
vLLM, and the oracle reward (VADER sentiment) of both backends' samples with a 95% interval.

    .venv/bin/python benchmarks/throughput_sampling.py --batch-sizes 4,16,64 --dtypes float32,bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

PROMPTS = [
    "Write one sentence about the sea.", "Describe your favourite film.", "What makes a good breakfast?",
    "Tell me about a rainy day.", "Review the restaurant you visited last week.", "Explain why cats purr.",
    "Give advice to a new student.", "Describe a mountain at dawn.", "What is the best way to learn piano?",
    "Write a short review of a novel.", "Describe the city at night.", "Why do people enjoy gardening?",
    "Tell a story about a lost dog.", "What do you think of modern art?", "Describe a busy market.",
    "Write a note to a friend.",
]


def _prompt_ids(tok, n: int) -> list[list[int]]:
    chats = [[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}] for i in range(n)]
    texts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def time_hf(model, tok, rows: int, k: int, args, cache: str) -> dict:
    import torch

    from exoalign.sampling import HFSampler, SamplingSettings

    s = SamplingSettings(temperature=0.8, max_new_tokens=args.new_tokens, min_new_tokens=args.min_new_tokens,
                         seed=0, batch_size=rows // k, kv_cache=cache)
    sampler = HFSampler(model, tok, s)
    prompts = _prompt_ids(tok, rows // k)
    sampler.generate(prompts[:1], [0], 1)  # warm-up (allocator, kernels)
    runs, n_tokens = [], 0
    for _ in range(args.reps):
        t = time.perf_counter()
        with torch.inference_mode():
            out = sampler.generate(prompts, list(range(len(prompts))), k)
        runs.append(time.perf_counter() - t)
        n_tokens = sum(len(c.ids) for group in out for c in group)
    sec = statistics.median(runs)
    return {"rows": rows, "tokens": n_tokens, "seconds": sec, "tokens_per_s": n_tokens / sec, "groups": out}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-sizes", default="4,16,64", help="rows per generate call (prompts x K)")
    p.add_argument("--dtypes", default="float32")
    p.add_argument("--caches", default="dynamic", help="dynamic and/or static")
    p.add_argument("--backends", default="hf")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--min-new-tokens", type=int, default=48)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    import torch

    from exoalign.models import load_causal_lm, load_tokenizer
    from exoalign.zoo import resolve_model_path

    torch.set_num_threads(args.threads)
    path = resolve_model_path(args.model)
    tok = load_tokenizer(path)
    results = {"model": args.model, "device": args.device, "threads": args.threads, "load_start": os.getloadavg()[0],
               "new_tokens": args.new_tokens, "k": args.k, "hf": []}
    groups_by_backend = {}
    for dtype in args.dtypes.split(","):
        model = load_causal_lm(path, dtype=dtype).to(args.device).eval()
        for cache in args.caches.split(","):
            for rows in (int(b) for b in args.batch_sizes.split(",")):
                r = time_hf(model, tok, rows, args.k, args, cache)
                groups_by_backend["hf"] = r.pop("groups")
                r.update(dtype=dtype, cache=cache, load=os.getloadavg()[0])
                results["hf"].append(r)
                print(json.dumps(r), flush=True)
        del model
    if "vllm" in args.backends.split(","):
        from exoalign.sampling import SamplingSettings, VLLMSampler

        rows = max(int(b) for b in args.batch_sizes.split(","))
        s = SamplingSettings(temperature=0.8, max_new_tokens=args.new_tokens, min_new_tokens=args.min_new_tokens,
                             seed=0, gpu_memory_utilization=0.5)
        sampler = VLLMSampler(path, tok, s)
        prompts = _prompt_ids(tok, rows // args.k)
        sampler.generate(prompts[:1], [0], 1)
        t = time.perf_counter()
        out = sampler.generate(prompts, list(range(len(prompts))), args.k)
        sec = time.perf_counter() - t
        n = sum(len(c.ids) for g in out for c in g)
        results["vllm"] = {"rows": rows, "tokens": n, "seconds": sec, "tokens_per_s": n / sec}
        groups_by_backend["vllm"] = out
        sampler.close()
    if len(groups_by_backend) == 2:
        from exoalign.eval.oracles import vader_sentiment

        results["reward"] = {}
        for name, groups in groups_by_backend.items():
            texts = [c.text for g in groups for c in g]
            r = vader_sentiment([""] * len(texts), texts)
            mean, sd = statistics.fmean(r), statistics.pstdev(r)
            results["reward"][name] = {"mean": mean, "ci95": 1.96 * sd / max(len(r), 1) ** 0.5, "n": len(r)}
        a, b = results["reward"]["hf"], results["reward"]["vllm"]
        results["reward"]["same_within_ci"] = abs(a["mean"] - b["mean"]) <= (a["ci95"] ** 2 + b["ci95"] ** 2) ** 0.5
    results["load_end"] = os.getloadavg()[0]
    print(json.dumps({k: v for k, v in results.items() if k != "hf"}), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
