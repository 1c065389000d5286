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

from ..data import GroupCollator, load_rows
from ..logprobs import sequence_logps
from ..train.config import DataBaseConfig, ModelConfig, TrainArgs, check_runnable
from ..train.engine import Job, fit
from ..train.loop import split_heldout
from ..train.run import start_run
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

    def rows(tokenizer):
        all_rows = load_rows(cfg.data.train_file, "sft", split=cfg.data.split, tokenizer=tokenizer,
                             columns=cfg.data.columns, preset=cfg.data.preset)
        return split_heldout(all_rows, cfg.data, args.seed, "sft", tokenizer)

    run = start_run(cfg, rows, lambda train_rows: [t for r in train_rows for t in (r["prompt"], r["completion"])])
    acc, tokenizer, model, train_data, eval_data, info = (run.acc, run.tokenizer, run.model, run.train_data,
                                                          run.eval_data, run.info)
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
