"""``train(cfg)``: align a causal LM on preference pairs or scored groups with a loss from the registry.

The steps, in order (each fails early with a one-line error on bad input):

1. load and validate every row (``exoalign.data.load_rows``), pick k completions per group, split off
   held-out rows, tokenise;
2. load the policy (or build it from scratch), with LoRA if configured;
3. reference log-probs: one pass before training, cached on disk (``refcache.py``), or an online reference;
4. the shared loop (``engine.fit``) with ``step.compute_loss`` as the loss.
"""

from __future__ import annotations

import logging
import random
from importlib import import_module
from pathlib import Path
from typing import Any

import torch

from ..data import GroupCollator, TokenizedData, load_rows, reorder, select_k, tokenize_rows
from ..errors import ConfigError
from ..losses import loss_info
from ..models import load_causal_lm
from .config import DataBaseConfig, TrainConfig, check_runnable
from .engine import Job, fit, preflight
from .refcache import attach, model_identity, ref_logps_table
from .setup import disable_dropout, load_model, load_tok, make_accelerator, prepare_source
from .step import compute_loss, is_peft
from .summary import report

logger = logging.getLogger(__name__)


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


def _texts(rows: list[dict]) -> list[str]:
    """Every prompt and completion: what a scratch model's tokeniser is trained on."""
    out = []
    for row in rows:
        out.append(row["prompt"])
        out.extend(row.get("completions") or [row.get("completion", "")])
    return out


def _cached_reference(acc: Any, cfg: TrainConfig, data: TokenizedData, tokenizer: Any, get_model: Any, ref_id: str,
                      what: str) -> tuple[TokenizedData, bool]:
    settings = {
        "max_length": cfg.data.max_length,
        "max_prompt_length": cfg.data.max_prompt_length,
        "temperature": cfg.loss.temperature,
        "dtype": cfg.model.dtype,
        "mixed_precision": cfg.train.mixed_precision,
    }
    table, hit = ref_logps_table(
        acc,
        data,
        cache_dir=cfg.train.cache_dir,
        model_id=ref_id,
        tokenizer=tokenizer,
        settings=settings,
        get_model=get_model,
        batch_size=cfg.train.ref_batch_size or cfg.train.batch_size,
        temperature=cfg.loss.temperature,
        desc=f"reference log-probs ({what})",
    )
    return attach(data, table), hit  # refcache logs the hit or miss, with the file


# exoalign.online sits above train (it samples, scores and then calls this package's loop), so train names the
# rounds' entry point instead of importing it, as cli.COMMANDS names the commands.
ROUNDS_ENTRY = "exoalign.online:train_online"


# The held-out reward and KL of an offline run sample and score with the eval stage's code (above train, too).
HELDOUT_ENTRY = "exoalign.online.heldout:offline_heldout"


def run_rounds(cfg: TrainConfig) -> Path:
    """Online training (``online.rounds >= 1``): the rounds of :mod:`exoalign.online`."""
    module, name = ROUNDS_ENTRY.split(":")
    return getattr(import_module(module), name)(cfg)


def train(cfg: TrainConfig) -> Path:
    """Run ``exoalign train``; returns ``output_dir/final`` (loadable with ``AutoModelForCausalLM.from_pretrained``)."""
    if cfg.online.rounds > 0:  # rounds of sampling from the current policy around the same loop
        return run_rounds(cfg)
    check_runnable(cfg)
    args = cfg.train
    preflight(args, warn=False)  # refuse a used output_dir before building anything
    acc = make_accelerator(args)
    out = Path(args.output_dir)
    scratch = cfg.model.init == "scratch"
    tokenizer = None if scratch else load_tok(cfg.model, cfg.model.name_or_path)
    train_rows, eval_rows = load_preference_data(cfg, tokenizer)

    source = prepare_source(
        acc, cfg.model, output_dir=out, texts=_texts(train_rows), max_length=cfg.data.max_length,
        seed=args.seed, resume=args.resume,
    )
    if tokenizer is None:
        tokenizer = load_tok(cfg.model, source)
    tok_kw = {"max_length": cfg.data.max_length, "max_prompt_length": cfg.data.max_prompt_length}
    train_data = tokenize_rows(train_rows, tokenizer, **tok_kw)
    eval_data = tokenize_rows(eval_rows, tokenizer, **tok_kw) if eval_rows else None
    if acc.is_main_process:
        logger.info("data: %d training rows, %d held-out; truncated %d prompts and %d completions",
                    len(train_data), len(eval_data or []), train_data.stats.get("truncated_prompts", 0),
                    train_data.stats.get("truncated_completions", 0))
    model = load_model(cfg.model, source).to(acc.device)
    info: dict[str, Any] = {"train_stats": train_data.stats, "eval_stats": eval_data.stats if eval_data else None,
                            "model_source": source, "num_processes": acc.num_processes}

    ref_model = None
    if loss_info(cfg.loss.name).needs_ref:
        ref_source = cfg.model.ref_name_or_path or source
        if args.ref_mode == "cached":
            loaded: list[torch.nn.Module] = []

            def get_ref() -> torch.nn.Module:
                # The starting policy is π_sft (weights not yet touched: training state loads later), so no
                # second copy is needed unless another reference was named.
                if cfg.model.ref_name_or_path is None:
                    return model
                if not loaded:
                    loaded.append(load_reference(cfg, ref_source).to(acc.device))
                return loaded[0]

            ref_id = model_identity(ref_source)
            train_data, hit = _cached_reference(acc, cfg, train_data, tokenizer, get_ref, ref_id, "train")
            info["ref_cache"] = {"train_hit": hit, "dir": str(args.cache_dir)}
            if eval_data is not None:
                eval_data, info["ref_cache"]["eval_hit"] = _cached_reference(
                    acc, cfg, eval_data, tokenizer, get_ref, ref_id, "eval")
            loaded.clear()
        elif cfg.model.ref_name_or_path is not None or not is_peft(model):
            ref_model = load_reference(cfg, ref_source).to(acc.device)

    def loss_fn(m: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return compute_loss(m, batch, cfg.loss, ref_model, prefix_sharing=args.prefix_sharing)

    heldout = None
    if eval_rows and (cfg.online.oracle or cfg.online.reward_model):  # reward and KL on held-out prompts too
        module, name = HELDOUT_ENTRY.split(":")
        heldout = getattr(import_module(module), name)(cfg, acc, out, eval_rows, tokenizer, model, ref_model, source)
    job = Job(model=model, tokenizer=tokenizer, train_data=train_data, collate=GroupCollator(tokenizer.pad_token_id),
              loss_fn=loss_fn, eval_data=eval_data, config=cfg, info=info, after_step=heldout)
    final = fit(acc, args, job)
    if heldout is not None:
        heldout.at_end(model)
    if acc.is_main_process:
        report(out, lr=args.lr)  # one summary line; a warning when the run was too small to change the model
    return final


def load_reference(cfg: TrainConfig, source: str) -> torch.nn.Module:
    """A frozen copy of the reference model, in eval mode with dropout off."""
    ref = load_causal_lm(source, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code)
    disable_dropout(ref)
    ref.eval()
    ref.requires_grad_(False)
    return ref
