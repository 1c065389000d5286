"""``exoalign rm train``: a Bradley–Terry reward model on preference pairs.

The model is ``AutoModelForSequenceClassification`` with one output (a causal-LM checkpoint gets a fresh
linear score head on its last non-padding token). For each pair the loss is

    L = −log σ(r(x, y_chosen) − r(x, y_rejected))

(Bradley & Terry 1952; Ouyang et al. 2022, eq. 1). Scored groups are used as their best-vs-worst pair. The
held-out accuracy — the fraction of held-out pairs whose chosen completion gets the higher reward — is logged
as ``eval/rewards/accuracies``, printed, and written to ``output_dir/eval.json``. The model is saved with
``save_pretrained`` (safetensors) to ``output_dir/final``, ready for ``exoalign score``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import GroupCollator, load_rows, reorder, select_k
from ..errors import ConfigError, InputError
from ..fileio import atomic_json
from ..rewards import scores
from ..train.config import DataBaseConfig, ModelConfig, TrainArgs, check_runnable
from ..train.engine import Job, fit, read_metrics
from ..train.loop import split_heldout
from ..train.run import start_run

logger = logging.getLogger(__name__)


@dataclass
class RMDataConfig(DataBaseConfig):
    """Preference pairs (or scored groups, used as best vs worst) for the reward model."""

    eval_fraction: float = 0.1
    """When eval_file is not given: hold out this fraction of the rows to measure accuracy (deterministic by seed)."""


@dataclass
class RMConfig:
    """``exoalign rm train``: a Bradley–Terry reward model."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The backbone (a causal-LM or sequence-classification checkpoint), or a scratch model."""
    data: RMDataConfig = field(default_factory=RMDataConfig)
    """Pairs {"prompt", "chosen", "rejected"} or scored groups."""
    train: TrainArgs = field(default_factory=TrainArgs)
    """Optimisation, logging, checkpoints."""


def as_pairs(rows: list[dict], file: str) -> list[dict]:
    """Each row as ``[chosen, rejected]``: pairs as given, scored groups as best vs worst by reward."""
    out = []
    for i, row in enumerate(rows):
        if len(row["completions"]) > 2:
            if row.get("rewards") is None:
                raise ConfigError(f"row {i + 1} of {file} is a group without rewards: nothing says which is better",
                                  field="data.train_file", fix="give pairs, or score the groups first (exoalign score)")
            row = select_k([row], 2, "best_worst")[0]
        r = row.get("rewards")
        if r is not None and r[1] > r[0]:
            row = reorder(row, [1, 0])  # rewards, finished flags and sampled ids follow their completions
        # A reward model reads text: `exoalign score` gives it (prompt, completion) texts with EOS appended, so it
        # is trained on the same form (not on the sampled ids, nor without EOS for a cut-off completion).
        out.append({k: v for k, v in row.items() if k not in ("finished", "completion_ids")})
    return out


def bt_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley–Terry loss on a collated pair batch ``[B*2, T]`` (column 0 chosen) and its metrics."""
    B, K = batch["group_mask"].shape
    r = scores(model, batch["input_ids"], batch["attention_mask"]).view(B, K)  # (B, 2)
    margin = r[:, 0] - r[:, 1]
    loss = -F.logsigmoid(margin).mean()
    metrics = {
        "loss": loss.detach(),
        "rewards/chosen": r[:, 0].detach().mean(),
        "rewards/rejected": r[:, 1].detach().mean(),
        "rewards/margins": margin.detach().mean(),
        "rewards/accuracies": (margin.detach() > 0).float().mean(),
    }
    return loss, metrics


def train_reward_model(cfg: RMConfig) -> Path:
    """Run ``exoalign rm train``; returns ``output_dir/final`` (``AutoModelForSequenceClassification``)."""
    check_runnable(cfg)
    args = cfg.train
    out = Path(args.output_dir)

    def rows(tokenizer):
        all_rows = load_rows(cfg.data.train_file, "preference", split=cfg.data.split, tokenizer=tokenizer,
                             columns=cfg.data.columns, preset=cfg.data.preset)
        train_rows, eval_rows = split_heldout(all_rows, cfg.data, args.seed, "preference", tokenizer)
        return as_pairs(train_rows, cfg.data.train_file), as_pairs(eval_rows, cfg.data.eval_file or cfg.data.train_file)

    run = start_run(cfg, rows, lambda train_rows: [t for r in train_rows for t in (r["prompt"], *r["completions"])],
                    head="reward")
    acc, tokenizer, model, train_data, eval_data, info = (run.acc, run.tokenizer, run.model, run.train_data,
                                                          run.eval_data, run.info)
    # The score is read at the last non-padding token, found through the pad id.
    model.config.pad_token_id = tokenizer.pad_token_id
    job = Job(model=model, tokenizer=tokenizer, train_data=train_data, collate=GroupCollator(tokenizer.pad_token_id),
              loss_fn=bt_loss, eval_data=eval_data, config=cfg, info=info)
    final = fit(acc, args, job)
    if eval_data is not None and acc.is_main_process:
        last = [r for r in read_metrics(out) if "eval/rewards/accuracies" in r][-1]
        result = {"accuracy": last["eval/rewards/accuracies"], "loss": last["eval/loss"], "pairs": len(eval_data)}
        atomic_json(out / "eval.json", result, indent=2)
        print(f"held-out accuracy: {result['accuracy']:.3f} on {len(eval_data)} pairs")
    return final


def main(argv: list[str]) -> int:
    from ..train.cli import run_stage

    if not argv or argv[0] in ("-h", "--help"):
        print("usage: exoalign rm train --config FILE [section.key=value ...] [--resume]\n\n"
              "Train a Bradley-Terry reward model on preference pairs; `exoalign rm train --help` lists the keys.")
        return 0
    if argv[0] != "train":
        raise InputError(f"unknown rm command {argv[0]!r}", field="command", fix="use `exoalign rm train --config FILE`")
    return run_stage("exoalign rm train", RMConfig, train_reward_model, argv[1:],
                     "Train a Bradley-Terry reward model (one-output sequence classifier) on preference pairs.")
