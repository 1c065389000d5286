"""``exoalign sft``: supervised fine-tuning on ``{"prompt", "completion"}`` (or conversational) rows.

The loss is the mean negative log-likelihood per completion token; prompt tokens are context only (their
labels are -100). The model can be a hub model / local directory or built from scratch (``model.init=scratch``:
a BPE tokeniser trained on the rows and a random model of ``model.model_type``), which is how the demo makes
its π_sft. Everything else — config sections ``model`` and ``train``, checkpoints, resume, metrics — is the
trainer's (``exoalign.train``), run by the same loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data import GroupCollator, load_rows, tokenize_rows
from ..logprobs import sequence_logps
from ..train.config import DataBaseConfig, ModelConfig, TrainArgs, check_runnable
from ..train.engine import Job, fit, preflight
from ..train.loop import split_heldout
from ..train.setup import load_model, load_tok, make_accelerator, prepare_source
from ..train.summary import report


@dataclass
class SFTConfig:
    """``exoalign sft``: supervised fine-tuning on prompt/completion rows."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model to fine-tune (or to build from scratch)."""
    data: DataBaseConfig = field(default_factory=DataBaseConfig)
    """SFT rows: {"prompt", "completion"} or conversational {"messages"}."""
    train: TrainArgs = field(default_factory=TrainArgs)
    """Optimisation, logging, checkpoints."""


def sft_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean NLL per completion token over the batch, and metrics ``loss``, ``ppl``, ``logps/completion``.

    ``batch`` is a :class:`~exoalign.data.GroupCollator` batch of groups of one: ``[B, T]`` rows whose labels
    are the completion tokens (EOS included) and -100 elsewhere.
    """
    logps, lengths = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])  # (B,), (B,)
    loss = -logps.sum() / lengths.sum().clamp(min=1)
    metrics = {"loss": loss.detach(), "ppl": loss.detach().exp(), "logps/completion": logps.detach().mean()}
    return loss, metrics


def sft(cfg: SFTConfig) -> Path:
    """Run ``exoalign sft``; returns ``output_dir/final`` (loadable with ``AutoModelForCausalLM.from_pretrained``)."""
    check_runnable(cfg)
    args = cfg.train
    preflight(args, warn=False)  # refuse a used output_dir before building anything
    acc = make_accelerator(args)
    scratch = cfg.model.init == "scratch"
    tokenizer = None if scratch else load_tok(cfg.model, cfg.model.name_or_path)
    rows = load_rows(cfg.data.train_file, "sft", split=cfg.data.split, tokenizer=tokenizer)
    train_rows, eval_rows = split_heldout(rows, cfg.data, args.seed, "sft", tokenizer)
    texts = [t for r in train_rows for t in (r["prompt"], r["completion"])]
    source = prepare_source(acc, cfg.model, output_dir=Path(args.output_dir), texts=texts,
                            max_length=cfg.data.max_length, seed=args.seed, resume=args.resume)
    if tokenizer is None:
        tokenizer = load_tok(cfg.model, source)
    tok_kw = {"max_length": cfg.data.max_length, "max_prompt_length": cfg.data.max_prompt_length}
    train_data = tokenize_rows(train_rows, tokenizer, **tok_kw)
    eval_data = tokenize_rows(eval_rows, tokenizer, **tok_kw) if eval_rows else None
    model = load_model(cfg.model, source)
    info = {"train_stats": train_data.stats, "eval_stats": eval_data.stats if eval_data else None, "model_source": source}
    job = Job(model=model, tokenizer=tokenizer, train_data=train_data, collate=GroupCollator(tokenizer.pad_token_id),
              loss_fn=sft_loss, eval_data=eval_data, config=cfg, info=info)
    final = fit(acc, args, job)
    if acc.is_main_process:
        report(args.output_dir, lr=args.lr)  # one summary line; a warning when too small to change the model
    return final


def main(argv: list[str]) -> int:
    from ..train.cli import run_stage

    return run_stage("exoalign sft", SFTConfig, sft, argv,
                     "Supervised fine-tuning on prompt/completion rows (loss on completion tokens only).")
