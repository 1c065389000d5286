"""Sampling speed of exoalign's sampler against plain ``model.generate``, same prompts, one run, SmolLM2.

Defaults are the demo's sample stage: 72 chat prompts × K = 4 completions, 24 new tokens (``min_new_tokens`` 1,
temperature 0.8), 64 prompts per call (the demo's ``gen_batch_size`` when issue 20 set this shape; the demo now
takes 128), 2 threads. Online rounds are smaller: the default demo's ``--prompts 12 --k 4 --batch-size 3 --threads
1`` (3 prompts × K = 4 a call, one thread, as a demo worker samples them), ``exoalign online``'s default round
``--prompts 32 --k 4 --batch-size 8 --new-tokens 32`` (8 prompts × K = 4 a call, every thread; docs/speed.md).
Systems, each timed on the same prompts (median of ``--reps``, after one small warm-up call):

* ``generate``        plain ``model.generate(do_sample=True)`` on the fp32 model, prompts repeated K times;
* ``exoalign_legacy`` :class:`~exoalign.sampling.HFSampler` as it was before the fast path
  (``shared_prefill=false``, fp32): per-completion seeds, every row prefilled on its own;
* ``exoalign_fp32``   the fast path in fp32 (each prompt prefilled once, scored draw): the same tokens as legacy;
* ``exoalign``        the fast path sampling from a bf16 copy of the weights (``sample_dtype=bfloat16``; the
                      fp32 weights on a CPU without bf16 units: ``--sample-dtype auto``, the default).

``speedup_vs_generate`` = exoalign's tokens/s / generate's; ``speedup_vs_legacy`` likewise. With
``--backends hf,vllm`` (GPU) vLLM is timed too, and the oracle reward (VADER) of its samples and exoalign's.

    .venv/bin/python benchmarks/throughput_sampling.py --json benchmarks/results/sampling/demo_shape.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
SYSTEMS = ("generate", "exoalign_legacy", "exoalign_fp32", "exoalign")


def _prompt_ids(tok, n: int) -> list[list[int]]:
    # Distinct prompts (the demo's are distinct review openings): the prompt number makes each one unique.
    chats = [[{"role": "user", "content": f"{PROMPTS[i % len(PROMPTS)]} ({i})"}] for i in range(n)]
    texts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def plain_generate(model, tok, args):
    """``fn(prompts, indices) -> groups of token-id lists``: model.generate(do_sample=True), rows = prompts × K."""
    import torch

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def run(prompts, indices):
        P = max(map(len, prompts))
        rows = [p for p in prompts for _ in range(args.k)]
        ids = torch.tensor([[pad] * (P - len(p)) + p for p in rows], device=args.device)  # (R, P) left padded
        mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in rows], device=args.device)
        torch.manual_seed(indices[0])
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=args.temperature,
                             top_k=0, top_p=1.0, max_new_tokens=args.new_tokens, min_new_tokens=args.min_new_tokens,
                             pad_token_id=pad, eos_token_id=tok.eos_token_id)[:, P:].tolist()
        eos = tok.eos_token_id
        cut = [r[: r.index(eos) + 1] if eos in r else r for r in out]
        return [cut[n * args.k : (n + 1) * args.k] for n in range(len(prompts))]

    return run


def exoalign_sampler(model, tok, args, **settings):
    from exoalign.sampling import HFSampler, SamplingSettings

    s = SamplingSettings(temperature=args.temperature, max_new_tokens=args.new_tokens,
                         min_new_tokens=args.min_new_tokens, seed=0, batch_size=args.batch_size, **settings)
    sampler = HFSampler(model, tok, s)

    def run(prompts, indices):
        return [[c.ids for c in g] for g in sampler.generate(prompts, indices, args.k)]

    return run


def time_system(fn, prompts, args) -> dict:
    import torch

    fn(prompts[:1], [0])  # warm-up: allocator, kernels, the bf16 copy
    runs, groups = [], []
    for _ in range(args.reps):
        t = time.perf_counter()
        groups = []
        with torch.inference_mode():
            for s in range(0, len(prompts), args.batch_size):
                idx = list(range(s, min(s + args.batch_size, len(prompts))))
                groups += fn([prompts[i] for i in idx], idx)
        runs.append(time.perf_counter() - t)
    n = sum(len(c) for g in groups for c in g)
    sec = statistics.median(runs)
    return {"tokens": n, "seconds": sec, "runs": runs, "tokens_per_s": n / sec, "load": os.getloadavg()[0],
            "groups": groups}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompts", type=int, default=72)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--min-new-tokens", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--batch-size", type=int, default=64, help="prompts per call (each expands to K rows)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"any of {','.join(SYSTEMS)}")
    p.add_argument("--sample-dtype", default="auto",
                   help="exoalign's sampling dtype (the 'exoalign' system): bfloat16, model, or auto (default: "
                        "bfloat16 where the device has bf16 matmul units, else model; exoalign.hardware.fast_bf16)")
    p.add_argument("--backends", default="hf", help="hf, or hf,vllm on a GPU")
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    import torch

    from exoalign.hardware import resolve_sample_dtype
    from exoalign.models import load_causal_lm, load_tokenizer
    from exoalign.zoo import resolve_model_path

    args.sample_dtype = resolve_sample_dtype(args.sample_dtype, args.device)  # the JSON records the dtype that ran

    torch.set_num_threads(args.threads)
    path = resolve_model_path(args.model)
    tok = load_tokenizer(path, padding_side="left")
    model = load_causal_lm(path, dtype="float32").to(args.device).eval()
    prompts = _prompt_ids(tok, args.prompts)
    results = {"model": args.model, "device": args.device, "cpu": _cpu_name(), "threads": args.threads,
               "torch": torch.__version__, "prompts": args.prompts, "k": args.k, "new_tokens": args.new_tokens,
               "min_new_tokens": args.min_new_tokens, "batch_size": args.batch_size,
               "sample_dtype": args.sample_dtype, "load_start": os.getloadavg()[0], "systems": {}}
    makers = {
        "generate": lambda: plain_generate(model, tok, args),
        "exoalign_legacy": lambda: exoalign_sampler(model, tok, args, shared_prefill=False),
        "exoalign_fp32": lambda: exoalign_sampler(model, tok, args),
        "exoalign": lambda: exoalign_sampler(model, tok, args, sample_dtype=args.sample_dtype),
    }
    groups = {}
    for name in args.systems.split(","):
        r = time_system(makers[name](), prompts, args)
        groups[name] = r.pop("groups")
        results["systems"][name] = r
        print(json.dumps({name: r}), flush=True)
    tps = {k: v["tokens_per_s"] for k, v in results["systems"].items()}
    if "exoalign" in tps and "generate" in tps:
        results["speedup_vs_generate"] = tps["exoalign"] / tps["generate"]
    if "exoalign" in tps and "exoalign_legacy" in tps:
        results["speedup_vs_legacy"] = tps["exoalign"] / tps["exoalign_legacy"]
    if "exoalign_fp32" in groups and "exoalign_legacy" in groups:
        results["fp32_same_tokens_as_legacy"] = groups["exoalign_fp32"] == groups["exoalign_legacy"]
    if "vllm" in args.backends.split(","):
        from exoalign.sampling import SamplingSettings, VLLMSampler

        s = SamplingSettings(temperature=args.temperature, max_new_tokens=args.new_tokens,
                             min_new_tokens=args.min_new_tokens, seed=0, gpu_memory_utilization=0.5)
        sampler = VLLMSampler(path, tok, s)
        r = time_system(lambda ps, idx: [[c.ids for c in g] for g in sampler.generate(ps, idx, args.k)], prompts, args)
        groups["vllm"] = r.pop("groups")
        results["systems"]["vllm"] = r
        sampler.close()
        from exoalign.eval.oracles import vader_sentiment

        results["reward"] = {}
        for name in ("exoalign", "vllm"):
            if name not in groups:
                continue
            texts = [tok.decode(c, skip_special_tokens=True) for g in groups[name] for c in g]
            rew = vader_sentiment([""] * len(texts), texts)
            mean, sd = statistics.fmean(rew), statistics.pstdev(rew)
            results["reward"][name] = {"mean": mean, "ci95": 1.96 * sd / max(len(rew), 1) ** 0.5, "n": len(rew)}
    results["load_end"] = os.getloadavg()[0]
    print(json.dumps({k: v for k, v in results.items() if k != "systems"}), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
