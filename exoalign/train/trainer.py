"""``exoalign.Trainer``: align a model held in memory (or named by a path, hub name or alias) on rows held in memory
(or in a file), from Python. ``exoalign train`` and :func:`exoalign.train.train` run through it too.

    trainer = exoalign.Trainer(model, train_data, tokenizer=tok, config={"loss": {"name": "exo"}}, callbacks=[cb])
    model = trainer.train()

The steps (each fails early with a one-line error on bad input):

1. rows: validated and normalised by ``load_rows`` (in-memory rows too: errors name the row's index), k completions
   kept per group, held-out rows split off (``eval_data``, ``data.eval_file`` or ``data.eval_fraction``), tokenised;
2. the policy: the object given (dropout off, LoRA and checkpointing as configured), or loaded / built from scratch;
3. reference log-probs: one pass before training, cached on disk (``refcache.py``) under a key that holds a
   fingerprint of the reference's weights (in memory) or of its weight files (a directory), or an online reference;
4. the shared loop (``engine.fit``) with ``step.compute_loss`` as the loss and the callbacks;
5. the ``summary:`` line.

With ``online.rounds >= 1`` the same class runs the online rounds (:mod:`exoalign.online`) around the same loop.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from importlib import import_module
from pathlib import Path
from typing import Any

import torch

from ..config import from_dict
from ..data import GroupCollator, TokenizedData, tokenize_rows
from ..errors import ConfigError
from ..logs import ensure_logging
from ..losses import loss_info
from ..models import check_model_dir
from .config import TrainConfig
from .engine import Job, fit, planned_rows, preflight
from .prepare import load_reference, prepare_rows, split_heldout, texts_of
from .refcache import attach, model_identity, ref_logps_table
from .rows import in_memory, load_any_rows
from .setup import apply_lora, disable_dropout, load_model, load_tok, make_accelerator, prepare_source
from .step import compute_loss, is_peft, unwrap
from .summary import report

logger = logging.getLogger(__name__)

# exoalign.online sits above train (it samples, scores and then calls this package's loop), so the Trainer names the
# rounds' entry point instead of importing it, as cli.COMMANDS names the commands.
ROUNDS_ENTRY = "exoalign.online:train_online"
# The held-out reward and KL of an offline run sample and score with the eval stage's code (above train, too).
HELDOUT_ENTRY = "exoalign.online.heldout:offline_heldout"


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A hash of ``model``'s class, parameter and buffer names, shapes, dtypes and values: the reference cache's
    key for a model that lives only in memory (same weights → same key, any changed weight → another key)."""
    digest = hashlib.sha256(type(unwrap(model)).__name__.encode())
    state = unwrap(model).state_dict()
    for name in sorted(state):
        t = state[name].detach()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return "weights:" + digest.hexdigest()[:16]


def as_config(config: Any) -> tuple[TrainConfig, bool]:
    """``(a TrainConfig of its own, whether the user chose an output_dir)`` from a TrainConfig, a dict with the
    YAML's keys, or None (the defaults)."""
    if config is None:
        return TrainConfig(), False
    if isinstance(config, TrainConfig):
        return copy.deepcopy(config), True
    if isinstance(config, dict):
        chosen = isinstance(config.get("train"), dict) and "output_dir" in config["train"]
        return from_dict(TrainConfig, config, source="config"), chosen
    raise ConfigError(f"config must be an exoalign.TrainConfig or a dict (got {type(config).__name__})",
                      field="config", fix='pass e.g. config={"loss": {"name": "exo"}, "train": {"lr": 1e-6}}')


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    disable_dropout(model)
    model.eval()
    model.requires_grad_(False)
    return model


class Trainer:
    """Align ``model`` on ``train_data`` with a loss from the registry; :meth:`train` returns the trained model.

    ``model``: a ``PreTrainedModel`` (PEFT-wrapped too), a directory, a hub name or an alias (``smollm2``); None
    with ``config.model.init=scratch`` (or a ``model.name_or_path`` in the config).
    ``train_data``: a list of dict rows, a ``datasets.Dataset``, or a path (every format ``load_rows`` reads); None
    uses ``config.data.train_file``. Rows are pairs ``{"prompt", "chosen", "rejected"}`` or groups
    ``{"prompt", "completions", "rewards"}`` (prompt rows online).
    ``tokenizer``: required with an in-memory model; else the model's own (``model.tokenizer`` to override).
    ``config``: an :class:`~exoalign.train.config.TrainConfig`, or a dict with the YAML's keys. Without
    ``train.output_dir`` the run writes to a temporary directory that is removed when :meth:`train` returns.
    ``ref_model``: the reference π_sft; default: a frozen copy of the model as given (the LoRA base for PEFT).
    ``eval_data``: held-out rows (same forms as ``train_data``), evaluated every ``train.eval_every`` steps and at
    the end.
    ``callbacks``: objects with any of ``on_step_end(state, metrics)``, ``on_round_end(state, metrics)``,
    ``on_save(state, path)`` (:class:`~exoalign.train.engine.TrainerState`).
    """

    def __init__(self, model: Any = None, train_data: Any = None, tokenizer: Any = None, config: Any = None,
                 ref_model: Any = None, eval_data: Any = None, callbacks: Sequence[Any] = ()) -> None:
        self.config, self._keep_output = as_config(config)
        cfg = self.config
        self.model_obj = model if isinstance(model, torch.nn.Module) else None
        if model is not None and self.model_obj is None:
            if not isinstance(model, (str, os.PathLike)):
                raise ConfigError(f"model must be a PreTrainedModel, a directory, a hub name or an alias (got "
                                  f"{type(model).__name__})", field="model", fix="pass e.g. model='smollm2'")
            cfg.model.name_or_path = os.fspath(model)
        self.ref_obj = ref_model if isinstance(ref_model, torch.nn.Module) else None
        if ref_model is not None and self.ref_obj is None:
            cfg.model.ref_name_or_path = os.fspath(ref_model)
        if train_data is not None and not in_memory(train_data):
            cfg.data.train_file = os.fspath(train_data)
        self.train_data = train_data if in_memory(train_data) else None
        if eval_data is not None and not in_memory(eval_data):
            cfg.data.eval_file = os.fspath(eval_data)
        self.eval_data = eval_data if in_memory(eval_data) else None
        self.tokenizer = tokenizer
        self.callbacks = list(callbacks)
        self.final: Path | None = None
        """``output_dir/final`` after :meth:`train` (None when the output directory was temporary)."""
        self._check()

    # ------------------------------------------------------------------------------------------ checks
    def _check(self) -> None:
        cfg = self.config
        if self.model_obj is not None:
            if self.tokenizer is None:
                raise ConfigError("an in-memory model needs its tokenizer", field="tokenizer",
                                  fix="pass tokenizer=AutoTokenizer.from_pretrained(...) (the one the model was trained with)")
            if cfg.model.init == "scratch":
                raise ConfigError("model.init=scratch builds its own model, but a model was given", field="model.init",
                                  fix="drop model.init=scratch, or pass model=None")
        elif cfg.model.init != "scratch":
            if not cfg.model.name_or_path:
                raise ConfigError("no model given", field="model.name_or_path",
                                  fix="set model.name_or_path to a directory, a hub name or smollm2 (from Python: pass "
                                      "the model, or a model object with tokenizer=), or model.init=scratch")
            check_model_dir(cfg.model.name_or_path, "model.name_or_path")
        if cfg.model.ref_name_or_path:
            check_model_dir(cfg.model.ref_name_or_path, "model.ref_name_or_path")
        if self.train_data is None and not cfg.data.train_file:
            raise ConfigError("no training data given", field="data.train_file",
                              fix="set data.train_file to a JSONL file (from Python: pass train_data, a list of rows, a "
                                  "datasets.Dataset or a path)")

    # ------------------------------------------------------------------------------------------- train
    def train(self) -> torch.nn.Module:
        """Train; returns the trained model object (the one given, trained in place; a PEFT model comes back with
        its adapters merged, as saved in ``output_dir/final``). Also prints the ``summary:`` line."""
        ensure_logging()
        temp = None
        if not self._keep_output:
            temp = tempfile.mkdtemp(prefix="exoalign-run-")
            self.config.train.output_dir = temp
        try:
            final, model = self.run()
        finally:
            if temp is not None:
                shutil.rmtree(temp, ignore_errors=True)
        self.final = None if temp is not None or not self.config.train.save_final else final
        return model

    def run(self) -> tuple[Path, torch.nn.Module]:
        """Train; ``(output_dir/final, the trained model)``."""
        if self.config.online.rounds > 0:
            return self._online()
        return self._offline()

    def _rows(self, tokenizer: Any) -> tuple[list[dict], list[dict]]:
        cfg, d = self.config, self.config.data
        source = self.train_data if self.train_data is not None else d.train_file
        cols = {"columns": d.columns, "preset": d.preset}
        rows = load_any_rows(source, "preference", what="train_data", split=d.split, tokenizer=tokenizer, **cols)
        if self.eval_data is not None:
            train_rows = rows
            eval_rows = load_any_rows(self.eval_data, "preference", what="eval_data", split=d.split, tokenizer=tokenizer,
                                      **cols)
        else:
            train_rows, eval_rows = split_heldout(rows, d, cfg.train.seed, "preference", tokenizer)
        name = d.train_file or "train_data"
        train_rows = prepare_rows(train_rows, cfg, name)
        if eval_rows:
            eval_rows = prepare_rows(eval_rows, cfg, d.eval_file or ("eval_data" if self.eval_data is not None else name))
        return train_rows, eval_rows

    def _policy(self, acc: Any, train_rows: list[dict], tokenizer: Any) -> tuple[torch.nn.Module, Any, str | None]:
        """The model to train, its tokeniser (a scratch model's is built here) and where it was loaded from (None for
        an in-memory model)."""
        cfg, args = self.config, self.config.train
        if self.model_obj is None:
            source = prepare_source(acc, cfg.model, output_dir=Path(args.output_dir), texts=texts_of(train_rows),
                                    max_length=cfg.data.max_length, seed=args.seed, resume=args.resume)
            tokenizer = tokenizer or load_tok(cfg.model, source)
            return load_model(cfg.model, source).to(acc.device), tokenizer, source
        model = self.model_obj
        if cfg.model.disable_dropout:
            disable_dropout(model)
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
        if cfg.model.lora_r > 0 and not is_peft(model):
            model = apply_lora(model, cfg.model)
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError("the model has no trainable parameters", field="model",
                              fix="unfreeze its weights (model.requires_grad_(True)) or add LoRA adapters")
        return model.to(acc.device), tokenizer, None

    def _offline(self) -> tuple[Path, torch.nn.Module]:
        cfg, args = self.config, self.config.train
        t0 = time.perf_counter()
        preflight(args, warn=False)  # refuse a used output_dir before building anything
        acc = make_accelerator(args)
        out = Path(args.output_dir)
        tokenizer = self.tokenizer
        if tokenizer is None and cfg.model.init != "scratch":
            tokenizer = load_tok(cfg.model, cfg.model.name_or_path)
        if tokenizer is not None and tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token  # as load_tokenizer does: padding needs a token
        train_rows, eval_rows = self._rows(tokenizer)
        t1 = time.perf_counter()
        model, tokenizer, source = self._policy(acc, train_rows, tokenizer)
        t2 = time.perf_counter()
        tok_kw = {"max_length": cfg.data.max_length, "max_prompt_length": cfg.data.max_prompt_length}
        train_data = tokenize_rows(train_rows, tokenizer, **tok_kw)
        eval_data = tokenize_rows(eval_rows, tokenizer, **tok_kw) if eval_rows else None
        if acc.is_main_process:
            logger.info("data: %d training rows, %d held-out; truncated %d prompts and %d completions",
                        len(train_data), len(eval_data or []), train_data.stats.get("truncated_prompts", 0),
                        train_data.stats.get("truncated_completions", 0))
        info: dict[str, Any] = {"train_stats": train_data.stats, "eval_stats": eval_data.stats if eval_data else None,
                                "model_source": source or f"in memory ({type(unwrap(model)).__name__})",
                                "num_processes": acc.num_processes}
        train_data, eval_data, ref_model = self._reference(acc, model, tokenizer, source, train_data, eval_data, info)
        # Start-up seconds before the first step (run_info.json; the demo reports them per job): accelerator,
        # tokeniser and rows; the policy's load; tokenising and the reference log-probs (a cache hit reads a file).
        info["startup"] = {"setup_s": t1 - t0, "load_s": t2 - t1, "reference_s": time.perf_counter() - t2}

        def loss_fn(m: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            return compute_loss(m, batch, cfg.loss, ref_model, prefix_sharing=args.prefix_sharing)

        heldout = None
        if eval_rows and (cfg.online.oracle or cfg.online.reward_model):  # reward and KL on held-out prompts too
            ref_for_kl = ref_model
            if ref_for_kl is None and source is None:  # an in-memory model: π_sft is its weights before the loop
                ref_for_kl = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)
            module, name = HELDOUT_ENTRY.split(":")
            heldout = getattr(import_module(module), name)(cfg, acc, out, eval_rows, tokenizer, model, ref_for_kl,
                                                           source)
        job = Job(model=model, tokenizer=tokenizer, train_data=train_data, collate=GroupCollator(tokenizer.pad_token_id),
                  loss_fn=loss_fn, eval_data=eval_data, config=cfg, info=info, callbacks=self.callbacks,
                  after_step=heldout)
        final = fit(acc, args, job)
        if heldout is not None:
            heldout.at_end(model)
        if acc.is_main_process:
            report(out, lr=args.lr)  # one summary line; a warning when the run was too small to change the model
        trained = unwrap(model)
        if is_peft(trained):  # the final save merged the adapters into the base model
            trained = trained.get_base_model()
        return final, trained

    def _reference(self, acc: Any, model: torch.nn.Module, tokenizer: Any, source: str | None, train_data: TokenizedData,
                   eval_data: TokenizedData | None, info: dict) -> tuple[TokenizedData, TokenizedData | None, Any]:
        """Attach cached reference log-probs to the data (ref_mode=cached), or the online reference model."""
        cfg, args = self.config, self.config.train
        if not loss_info(cfg.loss.name).needs_ref:
            return train_data, eval_data, None
        named = cfg.model.ref_name_or_path
        if args.ref_mode == "online":
            if self.ref_obj is not None:
                return train_data, eval_data, _frozen(self.ref_obj).to(acc.device)
            if named is None and is_peft(model):
                return train_data, eval_data, None  # the base under the adapters is π_sft
            if named is None and source is None:
                return train_data, eval_data, _frozen(copy.deepcopy(unwrap(model)))
            return train_data, eval_data, load_reference(cfg, named or source).to(acc.device)
        loaded: list[torch.nn.Module] = []

        def get_ref() -> torch.nn.Module:
            # The starting policy is π_sft (weights not yet touched: training state loads later), so no
            # second copy is needed unless another reference was given.
            if self.ref_obj is not None:
                return _frozen(self.ref_obj).to(acc.device)
            if named is None:
                return model
            if not loaded:
                loaded.append(load_reference(cfg, named).to(acc.device))
            return loaded[0]

        if self.ref_obj is not None:
            ref_id = weights_fingerprint(self.ref_obj)
        elif named is not None or source is not None:
            ref_id = model_identity(named or source)
        else:
            ref_id = weights_fingerprint(model)
        train_data, hit = self._cached(acc, train_data, tokenizer, get_ref, ref_id, "train")
        info["ref_cache"] = {"train_hit": hit, "dir": str(args.cache_dir), "model": ref_id}
        if eval_data is not None:
            eval_data, info["ref_cache"]["eval_hit"] = self._cached(acc, eval_data, tokenizer, get_ref, ref_id, "eval")
        loaded.clear()
        return train_data, eval_data, None

    def _cached(self, acc: Any, data: TokenizedData, tokenizer: Any, get_model: Any, ref_id: str,
                what: str) -> tuple[TokenizedData, bool]:
        cfg = self.config
        settings = {"max_length": cfg.data.max_length, "max_prompt_length": cfg.data.max_prompt_length,
                    "temperature": cfg.loss.temperature, "dtype": cfg.model.dtype,
                    "mixed_precision": cfg.train.mixed_precision}
        args = cfg.train
        # A run of a few steps over a large dataset needs the reference on the rows it will read only.
        rows = planned_rows(len(data), args.seed, batch_size=args.batch_size, grad_accum=args.grad_accum,
                            num_processes=acc.num_processes, max_steps=args.max_steps) if what == "train" else None
        table, hit = ref_logps_table(
            acc, data, cache_dir=args.cache_dir, model_id=ref_id, tokenizer=tokenizer, settings=settings,
            get_model=get_model, batch_size=args.ref_batch_size or args.batch_size,
            temperature=cfg.loss.temperature, desc=f"reference log-probs ({what})", rows=rows,
            prefix_sharing=args.prefix_sharing,
        )
        if rows is not None and acc.is_main_process:
            logger.info("reference log-probs (%s): the %d of %d rows that %d steps read", what, len(rows), len(data),
                        args.max_steps)
        return attach(data, table), hit  # refcache logs the hit or miss, with the file

    # ------------------------------------------------------------------------------------------ online
    def _online(self) -> tuple[Path, torch.nn.Module]:
        """The online rounds (:mod:`exoalign.online`) read a model directory and a prompts file: an in-memory model, reference
        or rows are written to ``output_dir/given`` first. The trained model is loaded back from ``final``."""
        from ..data import write_rows
        from ..models import load_causal_lm

        module, name = ROUNDS_ENTRY.split(":")
        train_online = getattr(import_module(module), name)

        cfg = self.config
        if self.eval_data is not None:
            raise ConfigError("held-out evaluation is not supported online", field="eval_data",
                              fix="drop eval_data (evaluate the final model with exoalign eval)")
        given = Path(cfg.train.output_dir) / "given"
        if self.model_obj is not None:
            preflight(cfg.train, warn=False)
            unwrap(self.model_obj).save_pretrained(given / "model", safe_serialization=True)
            self.tokenizer.save_pretrained(given / "model")
            cfg.model.name_or_path = str(given / "model")
        if self.ref_obj is not None:
            unwrap(self.ref_obj).save_pretrained(given / "ref", safe_serialization=True)
            cfg.model.ref_name_or_path = str(given / "ref")
        if self.train_data is not None:
            d = cfg.data
            rows = load_any_rows(self.train_data, "prompt", what="train_data", tokenizer=self.tokenizer,
                                 columns=d.columns, preset=d.preset)
            cfg.data.train_file = str(write_rows(given / "prompts.jsonl", rows))
        final = train_online(cfg, callbacks=self.callbacks)
        return final, load_causal_lm(str(final), dtype=cfg.model.dtype)
