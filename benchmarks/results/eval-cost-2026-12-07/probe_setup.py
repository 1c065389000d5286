"""Shared set-up of the eval probes: SmolLM2's bf16 sampling copy and the demo's 37 distinct eval prompts, encoded
as ``exoalign eval`` encodes them (chat template, at most 64 tokens), on one thread."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from exoalign.data import encode_prompts  # noqa: E402
from exoalign.demo import reviews  # noqa: E402
from exoalign.models import load_causal_lm, load_tokenizer  # noqa: E402
from exoalign.sampling import load_prompts, sampling_copy  # noqa: E402
from exoalign.zoo import resolve_model_path  # noqa: E402

torch.set_num_threads(1)


def setup() -> tuple[torch.nn.Module, list[list[int]], int]:
    """(SmolLM2's bf16 sampling copy, the prompts' token ids, pad id)."""
    sft = resolve_model_path("smollm2")
    tok = load_tokenizer(sft, padding_side="left")
    rows = reviews.prompt_rows(reviews.generate_reviews(40, seed=1), seed=1)
    path = Path(tempfile.mkdtemp()) / "prompts.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "Continue this movie review: "
                                                      + r["prompt"]}]}) + "\n" for r in rows), encoding="utf-8")
    prompts = load_prompts(str(path), split="train", tokenizer=tok, dedupe=True, limit=None, columns=None,
                           preset=None)
    model = load_causal_lm(sft, dtype="float32").eval().requires_grad_(False)
    return sampling_copy(model, "bfloat16"), encode_prompts(tok, prompts, 64), tok.pad_token_id


def timed(fn, n: int) -> list[float]:
    """Seconds of ``n`` calls of ``fn``."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out
