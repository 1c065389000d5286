"""The bias of the bf16 evaluation's KL: a copy of π_sft (a symlink, so it is evaluated as a checkpoint; true KL 0)
through ``exoalign eval`` at the demo's eval shape with 4 samples per prompt, sample_dtype=bfloat16.
``PYTHONPATH=<code> python kl_bias.py [dtype]``"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

import probe_setup  # noqa: F401  (one thread, passive OpenMP waits)

from exoalign.demo import reviews
from exoalign.eval.evaluate import EvalConfig, run
from exoalign.zoo import resolve_model_path


def main() -> None:
    dtype = sys.argv[1] if len(sys.argv) > 1 else "bfloat16"
    sft = resolve_model_path("smollm2")
    d = Path(tempfile.mkdtemp())
    rows = reviews.prompt_rows(reviews.generate_reviews(40, seed=1), seed=1)
    (d / "p.jsonl").write_text("".join(json.dumps({"messages": [{"role": "user", "content": "Continue this movie review: "
                                                   + r["prompt"]}]}) + "\n" for r in rows), encoding="utf-8")
    (d / "copy").symlink_to(sft, target_is_directory=True)
    out = run(EvalConfig(checkpoints=[str(d / "copy")], sft_model=sft, prompts=str(d / "p.jsonl"),
                         oracle=reviews.ORACLE, samples_per_prompt=4, temperature=1.0, max_new_tokens=24,
                         max_prompt_length=64, min_new_tokens=1, seed=1000, batch_size=64, win_rate=False,
                         output=str(d / "eval.json"), device="cpu", logp_batch_size=64, sample_dtype=dtype,
                         save_samples=True))
    r = json.loads(out.read_text())["results"][0]
    print(dtype, "kl", r["kl"], "se", r["kl_se"], "k3", r["kl_k3"])
    samples = [json.loads(line) for f in (d / "eval.samples").glob("*.jsonl") for line in f.open()]
    diff = [a - b for row in samples for a, b in zip(row["logps"], row["ref_logps"])]
    print("per-sequence lp_pi - lp_ref: mean", statistics.mean(diff), "sd", statistics.pstdev(diff), "n", len(diff))


if __name__ == "__main__":
    main()
