"""Rows and models before training: held-out split, k-selection and pair order, a scratch tokeniser's texts, the
frozen reference. Shared by ``exoalign train`` (the Trainer), ``sft`` and ``rm train``."""

from __future__ import annotations

import random
from typing import Any

import torch

from ..data import load_rows, reorder, select_k
from ..errors import ConfigError
from ..models import load_causal_lm
from .config import DataBaseConfig, TrainConfig
from .setup import disable_dropout


def split_heldout(rows: list[dict], data: DataBaseConfig, seed: int, kind: str, tokenizer: Any) -> tuple[list, list]:
    """``(train rows, held-out rows)``: the eval file's rows, or a seeded ``eval_fraction`` of the training rows."""
    if data.eval_file:
        return rows, load_rows(data.eval_file, kind, split=data.split, tokenizer=tokenizer, columns=data.columns,
                               preset=data.preset)
    if data.eval_fraction <= 0:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(round(data.eval_fraction * len(rows))))
    if n_eval >= len(rows):
        raise ConfigError(f"holding out {n_eval} of the {len(rows)} rows leaves none to train on",
                          file=data.train_file, field="data.eval_fraction",
                          fix="give more rows, lower data.eval_fraction, or set it to 0")
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def prepare_rows(rows: list[dict], cfg: TrainConfig, file: str) -> list[dict]:
    """Check the rows against the loss's needs, keep ``data.k`` completions, and order pairs best-first."""
    if cfg.loss.target == "rw":
        for i, row in enumerate(rows):
            if row.get("rewards") is None:
                raise ConfigError(
                    f"loss.target=rw needs rewards, but row {i + 1} of {file} has none",
                    field="loss.target",
                    fix="use loss.target=pref for chosen/rejected pairs, or score the groups first (exoalign score)",
                )
    if cfg.data.k is not None:
        rows = select_k(rows, cfg.data.k, cfg.data.k_select, cfg.train.seed)
    if cfg.loss.target == "pref":
        out = []
        for i, row in enumerate(rows):
            n = len(row["completions"])
            if n != 2:
                raise ConfigError(
                    f"loss.target=pref needs 2 completions per row, row {i + 1} of {file} has {n}",
                    field="data.k",
                    fix="set data.k=2 (best vs worst by reward), or use loss.target=rw",
                )
            r = row.get("rewards")
            # Pref targets put the chosen completion in column 0: a scored row is ordered best first.
            if r is not None and r[1] > r[0]:
                row = reorder(row, [1, 0])  # rewards, finished flags and sampled ids follow their completions
            out.append(row)
        rows = out
    return rows


def load_preference_data(cfg: TrainConfig, tokenizer: Any) -> tuple[list[dict], list[dict]]:
    """Validated, normalised training and held-out rows (before any model is loaded)."""
    d = cfg.data
    rows = load_rows(d.train_file, "preference", split=d.split, tokenizer=tokenizer, columns=d.columns,
                     preset=d.preset)
    train_rows, eval_rows = split_heldout(rows, d, cfg.train.seed, "preference", tokenizer)
    train_rows = prepare_rows(train_rows, cfg, d.train_file)
    if eval_rows:
        eval_rows = prepare_rows(eval_rows, cfg, d.eval_file or d.train_file)
    return train_rows, eval_rows


def texts_of(rows: list[dict]) -> list[str]:
    """Every prompt and completion: what a scratch model's tokeniser is trained on."""
    out = []
    for row in rows:
        out.append(row["prompt"])
        out.extend(row.get("completions") or [row.get("completion", "")])
    return out


def load_reference(cfg: TrainConfig, source: str) -> torch.nn.Module:
    """A frozen copy of the reference model, in eval mode with dropout off."""
    ref = load_causal_lm(source, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code)
    disable_dropout(ref)
    ref.eval()
    ref.requires_grad_(False)
    return ref
