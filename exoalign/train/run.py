"""The one set-up every training stage starts from (``exoalign sft``, ``rm train``, ``train``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from ..data import tokenize_rows
from .engine import preflight
from .setup import Head, load_model, load_tok, make_accelerator, prepare_source


@dataclass
class RunStart:
    """What every training stage starts from: the accelerator, the tokeniser, the model and the tokenised data."""

    acc: Accelerator
    tokenizer: Any
    source: str
    model: torch.nn.Module
    train_data: Any
    eval_data: Any | None
    info: dict[str, Any] = field(default_factory=dict)


def start_run(
    cfg: Any,
    rows: Callable[[Any], tuple[list[dict], list[dict]]],
    texts: Callable[[list[dict]], list[str]],
    *,
    head: Head = "causal",
) -> RunStart:
    """The one set-up of ``exoalign sft``, ``rm train`` and ``train`` (and the online rounds' start).

    Refuses a used ``output_dir`` before building anything, makes the accelerator, loads the tokeniser (a scratch
    model's is trained on ``texts(train_rows)``), reads the rows with ``rows(tokenizer) -> (train, held-out)``,
    builds or resolves the starting model and tokenises both splits with ``cfg.data``'s lengths.
    """
    args = cfg.train
    preflight(args, warn=False)
    acc = make_accelerator(args)
    tokenizer = None if cfg.model.init == "scratch" else load_tok(cfg.model, cfg.model.name_or_path)
    train_rows, eval_rows = rows(tokenizer)
    source = prepare_source(acc, cfg.model, output_dir=Path(args.output_dir), texts=texts(train_rows),
                            max_length=cfg.data.max_length, seed=args.seed, resume=args.resume, head=head)
    if tokenizer is None:
        tokenizer = load_tok(cfg.model, source)
    tok_kw = {"max_length": cfg.data.max_length, "max_prompt_length": cfg.data.max_prompt_length}
    train_data = tokenize_rows(train_rows, tokenizer, **tok_kw)
    eval_data = tokenize_rows(eval_rows, tokenizer, **tok_kw) if eval_rows else None
    model = load_model(cfg.model, source, head=head)
    info = {"train_stats": train_data.stats, "eval_stats": eval_data.stats if eval_data else None,
            "model_source": source, "num_processes": acc.num_processes}
    return RunStart(acc, tokenizer, source, model, train_data, eval_data, info)
