"""The one prompt encoder: prompt text → token ids, the same for training, sampling and evaluation.

A tokeniser such as Llama-3's or Gemma's adds BOS itself, and their chat templates also write BOS at the start
of the text. Encoding a rendered prompt with the special tokens would then give two BOS tokens. So a prompt
gets the tokeniser's special tokens unless its text already starts with the BOS token (a chat template put it
there). Training (``tokenize_rows``), ``exoalign sample`` and ``exoalign eval`` all call :func:`encode_prompts`,
so the model is sampled and evaluated on exactly the prompt ids it was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def encode_prompts(tokenizer: Any, prompts: Sequence[str], max_prompt_length: int | None = None) -> list[list[int]]:
    """Token ids of each prompt: special tokens added unless the text already starts with BOS; with
    ``max_prompt_length``, cut from the LEFT to that many tokens (the end, next to the completion, is kept)."""
    prompts = list(prompts)
    bos = tokenizer.bos_token
    rendered = [bool(bos) and p.startswith(bos) for p in prompts]  # a chat template already wrote the BOS
    out: list[list[int]] = [[] for _ in prompts]
    for flag in (False, True):
        idx = [i for i, r in enumerate(rendered) if r == flag]
        if idx:  # one batched call per setting: the fast tokeniser encodes a list in parallel
            ids = tokenizer([prompts[i] for i in idx], add_special_tokens=not flag)["input_ids"]
            for i, x in zip(idx, ids):
                out[i] = list(x)
    if max_prompt_length is not None:
        out = [ids[-max_prompt_length:] for ids in out]
    return out
