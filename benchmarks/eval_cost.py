"""What one checkpoint's evaluation costs against its generation, at the demo's eval shape, SmolLM2.

``exoalign eval`` of π_sft and ``--checkpoints`` copies of it (other paths, so each is loaded and evaluated as a
checkpoint: its own sampling, π_sft's KL pass) on the demo's shape: 40 held-out review prompts × 1 sample,
24 new tokens, 64 prompts per generation batch, one thread (what a demo eval worker has), sampling from bf16
copies (the demo's ``sample_dtype``; ``--sample-dtype model`` for fp32). Writes the eval
JSON's ``timings`` and, per checkpoint, ``total_s / generation_s`` (issue 20's goal: ≤ 1.5).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/eval_cost.py --json benchmarks/results/eval_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", required=True, help="output JSON")
    ap.add_argument("--checkpoints", type=int, default=2, help="copies of π_sft evaluated as checkpoints")
    ap.add_argument("--prompts", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sample-dtype", default="bfloat16", help="eval's sample_dtype (the demo's: bfloat16) or model")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(args.threads)
    from exoalign.demo import reviews
    from exoalign.eval.evaluate import EvalConfig, run
    from exoalign.zoo import resolve_model_path

    sft = resolve_model_path("smollm2")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        rows = reviews.prompt_rows(reviews.generate_reviews(args.prompts, seed=1), seed=1)
        (d / "prompts.jsonl").write_text("".join(json.dumps({"messages": [{"role": "user", "content":
                                         "Continue this movie review: " + r["prompt"]}]}) + "\n" for r in rows),
                                         encoding="utf-8")
        ckpts = []
        for i in range(args.checkpoints):
            (d / f"ckpt{i}").symlink_to(sft, target_is_directory=True)
            ckpts.append(str(d / f"ckpt{i}"))
        t0 = time.perf_counter()
        out = run(EvalConfig(checkpoints=[sft, *ckpts], sft_model=sft, prompts=str(d / "prompts.jsonl"),
                             oracle=reviews.ORACLE, samples_per_prompt=1, temperature=1.0, max_new_tokens=24,
                             max_prompt_length=64, min_new_tokens=1, seed=1000, batch_size=64, win_rate=False,
                             output=str(d / "eval.json"), device="cpu", logp_batch_size=64,
                             sample_dtype=args.sample_dtype))
        wall = time.perf_counter() - t0
        state = json.loads(out.read_text(encoding="utf-8"))
    timings = state["timings"]
    per = {r["name"]: {**timings[r["name"]], "ratio": timings[r["name"]]["total_s"] / timings[r["name"]]["generation_s"]}
           for r in state["results"]}
    record = {"wall_s": wall, "threads": args.threads, "sample_dtype": args.sample_dtype, "n_prompts": args.prompts, "setup_s": timings["setup_s"],
              "checkpoints": per, "load": os.getloadavg()}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=1), encoding="utf-8")
    for name, t in per.items():
        print(f"{name}: generation {t['generation_s']:.2f} s, total {t['total_s']:.2f} s, ratio {t['ratio']:.2f}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
