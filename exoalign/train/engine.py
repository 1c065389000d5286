"""The training loop shared by ``exoalign train``, ``sft`` and ``rm train``, built on ``accelerate``.

A stage hands :func:`fit` a :class:`Job` — model, tokeniser, datasets, a collator and a ``loss_fn(model,
batch) -> (loss, metrics)`` — and the loop does the rest: AdamW, the LR schedule with warm-up, gradient
accumulation, clipping, bf16 autocast, DDP/FSDP/DeepSpeed (whatever ``accelerate launch`` configured), the
progress bar, metrics (``metrics.jsonl`` + trackers), held-out evaluation, NaN/inf handling, atomic checkpoints
and exact resume.

Exact resume: the data order of epoch ``e`` is a permutation seeded by ``(seed, e)``; a checkpoint records the
step and the position in the epoch (micro-batches consumed), and resuming skips exactly those batches, with
model, optimizer, scheduler and RNG states restored by ``accelerator.load_state``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm
from transformers import get_scheduler

from ..attention import training_attention
from ..config import save_config, to_dict
from ..errors import ConfigError
from ..fileio import atomic_json, atomic_write
from ..hardware import keep_freed_memory, warn_slow_bf16
from ..logprobs import head_mode, logits_grad_in_place
from ..models import own_trainable_weights
from .checkpoint import (
    COMPLETE,
    STATE_FILE,
    all_finite,
    final_from_checkpoint,
    finish,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    save_pretrained_atomic,
)
from .config import TrainArgs
from .setup import make_optimizer
from .step import compile_model, eager_fallback, is_peft

logger = logging.getLogger(__name__)

LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN/inf loss under ``nan_policy=stop``); the CLI prints it and exits 1."""


@dataclass
class TrainerState:
    """What callbacks see: ``on_step_end(state, metrics)``, ``on_round_end(state, metrics)``, ``on_save(state, path)``.

    The object is the same for the whole run; its fields are updated before each call.
    """

    step: int = 0
    """Optimizer steps done."""
    max_steps: int = 0
    """Optimizer steps the run will make."""
    epoch: float = 0.0
    """Passes over the training data so far (fractional)."""
    output_dir: Path | None = None
    """The run's directory (metrics.jsonl, checkpoints, final)."""
    model: Any = None
    """The model being trained (unwrapped from DDP/accelerate)."""


def call_back(callbacks: Sequence[Any], hook: str, *args: Any) -> None:
    """``cb.<hook>(*args)`` for every callback that defines it."""
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if callable(fn):
            fn(*args)


def wants(callbacks: Sequence[Any], hook: str) -> bool:
    return any(callable(getattr(cb, hook, None)) for cb in callbacks)


@dataclass
class Job:
    """What a stage plugs into the shared loop."""

    model: torch.nn.Module
    tokenizer: Any
    train_data: Sized
    collate: Callable[[list], dict]
    loss_fn: LossFn
    eval_data: Sized | None = None
    config: Any = None
    """The stage's whole config: saved as output_dir/config.yaml and given to the trackers."""
    info: dict = field(default_factory=dict)
    """Extra facts about the run (cache hits, truncation counts) written to output_dir/run_info.json."""
    after_step: Callable[[int], dict | None] | None = None
    """Called with the step count after each optimizer step (after logging, before held-out evaluation and the
    checkpoint); metrics it returns are written as a record of that step. Online training refills
    ``train_data`` with the next round's groups here, so a checkpoint at that step already includes them."""
    callbacks: Sequence[Any] = ()
    """Objects with any of ``on_step_end(state, metrics)`` (after every optimizer step, with that step's metrics),
    ``on_round_end(state, metrics)`` (when ``after_step`` returned metrics: the end of an online round) and
    ``on_save(state, path)`` (after each checkpoint and the final model are written)."""


class EpochSampler(Sampler[int]):
    """A fresh permutation of ``range(n)`` per epoch, seeded by ``(seed, epoch)``: reproducible and resumable.

    The epoch is set with :meth:`use_epoch`, deliberately not ``set_epoch``: accelerate's data loaders call
    ``sampler.set_epoch(<their own iteration count>)``, which a skip-ahead loader made for resuming restarts.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def planned_rows(n: int, seed: int, *, batch_size: int, grad_accum: int, num_processes: int,
                 max_steps: int | None) -> list[int] | None:
    """The rows a run of ``max_steps`` optimizer steps will read, sorted, or None when it reads them all.

    The order is :class:`EpochSampler`'s: epoch 0's permutation, cut into batches of ``batch_size``; the processes
    take the batches in turn (accelerate's sharding), so ``max_steps · grad_accum · num_processes`` steps' worth of
    micro-batches are the first that many batches of epoch 0. A plan that reaches the epoch's last (possibly
    short) batch, or runs by epochs, reads every row: None. Resuming continues the same order, so the rows are
    the same for a resumed run with the same settings.
    """
    if max_steps is None:
        return None
    batches = max_steps * grad_accum * num_processes
    if batches >= math.ceil(n / batch_size):
        return None
    return sorted(list(EpochSampler(n, seed))[: batches * batch_size])


class _Window:
    """Metrics since the last log: per-micro-batch ones and per-step ones (grad_norm), averaged separately, then
    reduced across processes when the window is logged."""

    def __init__(self) -> None:
        self.micro: dict[str, torch.Tensor] = {}
        self.per_step: dict[str, torch.Tensor] = {}
        self.micro_count = 0
        self.step_count = 0
        self.steps = 0
        self.tokens: torch.Tensor | float = 0.0  # a device tensor once counted: no host sync per micro-batch
        self.start = time.perf_counter()

    @staticmethod
    def _acc(into: dict[str, torch.Tensor], metrics: dict[str, torch.Tensor]) -> None:
        for k, v in metrics.items():
            v = v.detach().float()
            into[k] = into[k] + v if k in into else v.clone()

    def add_micro(self, metrics: dict[str, torch.Tensor], tokens: torch.Tensor) -> None:
        if metrics:
            self._acc(self.micro, metrics)
            self.micro_count += 1
        self.tokens += tokens

    def add_step(self, metrics: dict[str, torch.Tensor]) -> None:
        self._acc(self.per_step, metrics)
        self.step_count += 1

    def result(self, accelerator: Any) -> dict[str, float]:
        device = accelerator.device
        means = {k: v / max(self.micro_count, 1) for k, v in self.micro.items()}
        means.update({k: v / max(self.step_count, 1) for k, v in self.per_step.items()})
        keys = sorted(means)
        vec = torch.stack([means[k].to(device) for k in keys]) if keys else torch.zeros(0, device=device)
        tokens = torch.as_tensor(self.tokens, dtype=torch.float32, device=device).reshape(1)
        if accelerator.num_processes > 1:
            vec = accelerator.reduce(vec, reduction="mean")
            tokens = accelerator.reduce(tokens, reduction="sum")
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {k: float(v) for k, v in zip(keys, vec.tolist())}
        out["perf/step_s"] = elapsed / max(self.steps, 1)
        out["perf/tokens_per_s"] = float(tokens.item()) / elapsed
        return out


def _finite_everywhere(accelerator: Any, value: torch.Tensor) -> bool:
    """True when ``value`` is finite on every process (all must agree, or DDP would hang)."""
    bad = (~torch.isfinite(value.detach().float())).any().float().reshape(1)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    return float(bad.item()) == 0.0


def _nan_message(what: str, step: int, args: TrainArgs, batch: dict | None) -> str:
    rows = ""
    if batch is not None and "index" in batch:
        rows = f"; rows {batch['index'].tolist()[:8]} of the training data"
    return (
        f"{what} at step {step + 1}{rows}. Likely causes: the learning rate is too high (train.lr={args.lr}), "
        f"bf16 overflow (train.mixed_precision={args.mixed_precision}; try no), or bad data in those rows. "
        "Set train.nan_policy=skip to skip such updates instead; no NaN weights were saved"
    )


@torch.no_grad()
def evaluate(accelerator: Any, model: torch.nn.Module, loader: DataLoader, loss_fn: LossFn) -> dict[str, float]:
    """Metrics of ``loss_fn`` over ``loader``, weighted by groups per batch, reduced across processes."""
    was_training = model.training
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    count = torch.zeros(1, device=accelerator.device)
    for batch in loader:
        n = float(len(batch["index"]))
        with accelerator.autocast():
            _, metrics = loss_fn(model, batch)
        for k, v in metrics.items():
            v = v.detach().float().to(accelerator.device) * n
            sums[k] = sums[k] + v if k in sums else v
        count += n
    model.train(was_training)
    keys = sorted(sums)
    vec = torch.stack([sums[k] for k in keys]) if keys else torch.zeros(0, device=accelerator.device)
    if accelerator.num_processes > 1:
        vec, count = accelerator.reduce(vec, reduction="sum"), accelerator.reduce(count, reduction="sum")
    return {f"eval/{k}": float(v) / max(float(count.item()), 1.0) for k, v in zip(keys, vec.tolist())}


class MetricsLog:
    """``output_dir/metrics.jsonl``: one JSON object per logged step (main process only)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def reset(self, keep_until: int | None) -> None:
        """Start fresh (None), or keep only records up to step ``keep_until`` (a resumed run rewrites the rest)."""
        if not self.enabled:
            return
        if keep_until is None or not self.path.exists():
            self.path.unlink(missing_ok=True)
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill
            if rec.get("step", 0) <= keep_until:
                kept.append(line)
        atomic_write(self.path, "".join(k + "\n" for k in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()


def read_metrics(output_dir: str | Path) -> list[dict]:
    """The records of ``output_dir/metrics.jsonl`` (for tests and reports)."""
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _flat_config(cfg: Any) -> dict[str, Any]:
    """A config as ``{"section.key": scalar}`` (trackers such as TensorBoard take only scalars and strings)."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix.rstrip(".")] = node if isinstance(node, (int, float, str, bool)) else str(node)

    walk(to_dict(cfg) if cfg is not None else {}, "")
    return out


def _plan(args: TrainArgs, batches_per_epoch: int) -> int:
    """Total optimizer steps: ``max_steps``, else ``epochs`` × steps per epoch."""
    steps_per_epoch = math.ceil(batches_per_epoch / args.grad_accum)
    return args.max_steps if args.max_steps is not None else max(1, math.ceil(args.epochs * steps_per_epoch))


def finished_state(output_dir: Path) -> dict | None:
    """The ``trainer_state.json`` of a complete ``output_dir/final`` (a run that ended), or None."""
    final = output_dir / "final"
    if not (final / COMPLETE).is_file():
        return None
    try:
        state = json.loads((final / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("step"), int) else None


def preflight(args: TrainArgs, *, warn: bool = True) -> Path | None:
    """Check ``output_dir`` before any work: the checkpoint to resume from (None for a fresh start).

    A fresh run refuses a directory holding an earlier run's checkpoints or its complete ``final`` (it would mix
    two runs); with ``resume`` and no complete checkpoint the run starts from step 0 with a warning — unless
    ``final`` shows that the run already ended (see :class:`_Run`).
    """
    out = Path(args.output_dir)
    if not args.resume:
        if list_checkpoints(out, warn=False) or (out / "final" / COMPLETE).is_file():
            raise ConfigError(
                f"{out} already holds checkpoints or the final model of an earlier run",
                field="train.output_dir",
                fix="pass --resume (train.resume=true) to continue it, or choose another output_dir",
            )
        return None
    found = list_checkpoints(out, warn=warn, only_resumable=True)
    resume_from = found[-1][1] if found else None
    ended = finished_state(out) if resume_from is None else None
    if ended is not None and args.max_steps is not None:
        _check_continuable(out, ended, args.max_steps)  # early when the total is known; else once data are loaded
    if resume_from is None and warn and ended is None:
        logger.warning("train.resume is set but %s has no complete checkpoint: starting from step 0", out)
    return resume_from


def _check_continuable(out: Path, ended: dict, total: int) -> None:
    """A run that ended without its optimizer state (train.save_final_state=false) can be resumed only to the
    step where it ended."""
    if ended["step"] < total:
        raise ConfigError(
            f"{out} holds a run that ended at step {ended['step']} without a checkpoint (its optimizer state was "
            f"not kept: train.save_final_state=false), so it cannot be continued to step {total}",
            field="train.resume",
            fix="start a new run in another output_dir (set train.save_final_state=true to keep a finished run "
                "continuable)",
        )


def _zero3(accelerator: Any) -> bool:
    """DeepSpeed ZeRO-3 gathers a weight only when its own module runs: lean MLPs read ``down_proj.weight``."""
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    return plugin is not None and getattr(plugin, "zero_stage", 0) == 3


class _Run:
    """The state of one training run and its parts: set-up and resume, one micro-batch, one update, logging,
    checkpoints and the final save. :func:`fit` drives it."""

    def __init__(self, accelerator: Any, args: TrainArgs, job: Job) -> None:
        self.acc, self.args, self.job = accelerator, args, job
        self.out = Path(args.output_dir)
        self.main = accelerator.is_main_process
        resume_from = preflight(args)
        if len(job.train_data) == 0:
            raise ConfigError("the training data has no rows", field="data.train_file", fix="give a file with rows")
        self.sampler = EpochSampler(len(job.train_data), args.seed)
        loader = DataLoader(job.train_data, batch_size=args.batch_size, sampler=self.sampler, collate_fn=job.collate)
        if accelerator.device.type == "cpu":  # weights the optimizer will write: out of the file's mapping now
            own_trainable_weights(job.model)
            keep_freed_memory()  # the step's freed blocks stay with the process (exoalign/hardware.py)
        if args.mixed_precision == "bf16":
            warn_slow_bf16(accelerator.device, "train.mixed_precision=bf16", "train.mixed_precision=no")
        self.params = [p for p in job.model.parameters() if p.requires_grad]
        optimizer = make_optimizer(job.model, args)  # AdamW; biases and norm weights without weight decay
        if getattr(args, "lean_activations", False) and not _zero3(accelerator):
            from ..lean import apply_lean_activations

            logger.debug("lean activations: %s", apply_lean_activations(job.model))
        if getattr(args, "compile", False):
            from ..gemm import remove_fast_linear

            remove_fast_linear(job.model)  # inductor picks its own kernels for the products
            compile_model(job.model)
        elif accelerator.device.type == "cpu":
            from ..gemm import apply_fast_linear

            apply_fast_linear(job.model)  # fp32 products through oneDNN where it is faster (exoalign/gemm.py)
        self.model, self.optimizer, self.loader = accelerator.prepare(job.model, optimizer, loader)
        self.total = _plan(args, len(self.loader))
        scheduler = get_scheduler(args.scheduler, optimizer, num_warmup_steps=args.warmup_steps,
                                  num_training_steps=self.total)
        self.scheduler = accelerator.prepare(scheduler)
        self.fold_clip = _can_fold_clip(accelerator, optimizer, self.params)
        self.eval_loader = None
        if job.eval_data is not None and len(job.eval_data) > 0:
            self.eval_loader = accelerator.prepare(
                DataLoader(job.eval_data, batch_size=args.batch_size, collate_fn=job.collate))

        # Progress: optimizer steps done, and where in which epoch the data stands (micro-batches consumed).
        self.step, self.epoch, self.position, self.nonfinite = 0, 0, 0, 0
        self.bad_update = False  # a micro-batch of the current update had a NaN/inf loss (nan_policy=skip)
        self.last_norm: Any = None  # the last update's gradient norm (for on_step_end)
        self.log = MetricsLog(self.out / "metrics.jsonl", self.main)
        self.last_saved = -1
        # A finished run keeps no optimizer state unless save_final_state, only `final` with its step: resuming it
        # after it ended is a no-op; continuing it further is impossible and refused before any write.
        self.ended = None if resume_from is not None or not args.resume else finished_state(self.out)
        if self.ended is not None:
            _check_continuable(self.out, self.ended, self.total)
            self.step = self.ended["step"]
            if self.main:
                logger.info("%s already ended at step %d: nothing to do", self.out, self.step)
            return
        self._write_run_files()
        if resume_from is not None:
            state = load_checkpoint(accelerator, resume_from)
            self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
            self.nonfinite = state.get("nonfinite_skipped", 0)
            self.last_saved = self.step
            if self.main:
                logger.info("resuming from %s (step %d)", resume_from, self.step)
                was = {k: state.get(k) for k in ("batch_size", "grad_accum", "num_processes")}
                now = {"batch_size": args.batch_size, "grad_accum": args.grad_accum,
                       "num_processes": accelerator.num_processes}
                if was != now:
                    logger.warning("resuming with %s but the checkpoint was written with %s: the data order and "
                                   "losses will differ from an uninterrupted run", now, was)
        self.log.reset(keep_until=self.step if resume_from is not None else None)
        if args.report_to:
            accelerator.init_trackers(args.project_name, config=_flat_config(job.config))
        self.window = _Window()
        self.public = TrainerState(step=self.step, max_steps=self.total, output_dir=self.out,
                                   model=accelerator.unwrap_model(self.model))
        self.per_step = wants(job.callbacks, "on_step_end")
        self.step_sums: dict[str, torch.Tensor] = {}
        self.step_micro = 0

    def _write_run_files(self) -> None:
        """``config.yaml`` and ``run_info.json`` (atomically: a kill never leaves half a file)."""
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.job.config is not None:
                save_config(self.job.config, self.out / "config.yaml")
            atomic_json(self.out / "run_info.json", json.loads(json.dumps(self.job.info, default=str)))

    # ------------------------------------------------------------------------------------------ steps
    def micro_step(self, batch: dict) -> None:
        """Forward and backward of one micro-batch (gradients accumulate until the update)."""
        # CPU attention of training (exoalign.attention): no key/value copies per query head; short bf16 attention
        # as plain matmuls (the flash kernel's backward is slow there). The backward is inside too: gradient
        # checkpointing recomputes the forward there and must run the same attention.
        with training_attention():
            # One backward per forward here, so the logits' storage may take their gradient (logits_grad_in_place).
            with self.acc.autocast(), head_mode(getattr(self.args, "chunked_head", "auto")), logits_grad_in_place():
                loss, metrics = eager_fallback(self.model, lambda: self.job.loss_fn(self.model, batch))
            if not _finite_everywhere(self.acc, loss):
                if self.args.nan_policy == "stop":
                    raise TrainingError(_nan_message(f"the loss is {float(loss.detach())}", self.step, self.args,
                                                     batch))
                self.bad_update = True
                # Backward of a zero loss all the same: every process must join the gradient all-reduce. The
                # batch's metrics are dropped on every process alike (the check above is global), so the metric
                # vectors reduced at the next log have the same keys everywhere.
                loss = torch.where(torch.isfinite(loss), loss, torch.zeros_like(loss))
                metrics = {}
            self.acc.backward(loss)
        self.window.add_micro(metrics, batch["attention_mask"].sum())
        if self.per_step and metrics:
            _Window._acc(self.step_sums, metrics)
            self.step_micro += 1

    def update(self, batch: dict) -> None:
        """Clip, then one optimizer + scheduler step — or, under nan_policy=skip, no step when anything was NaN/inf."""
        if self.fold_clip:
            norm, scale = _clip_scale(self.params, self.args.max_grad_norm)
        else:
            norm, scale = self.acc.clip_grad_norm_(self.params, self.args.max_grad_norm or float("inf")), None
        finite_norm = norm is None or _finite_everywhere(self.acc, torch.as_tensor(norm))
        if not finite_norm and self.args.nan_policy == "stop":
            raise TrainingError(_nan_message("the gradient norm is not finite", self.step, self.args, batch))
        if self.bad_update or not finite_norm:
            self.nonfinite += 1  # the weights stay as they were
        else:
            if scale is not None:  # the clip, applied by the fused kernel as it reads each gradient
                self.fold_clip.grad_scale = scale
            try:
                self.optimizer.step()
            finally:
                if scale is not None:
                    del self.fold_clip.grad_scale
            self.scheduler.step()
            if norm is not None:
                self.window.add_step({"grad_norm": torch.as_tensor(norm)})
        self.optimizer.zero_grad(set_to_none=True)
        self.bad_update = False
        self.step += 1
        self.window.steps += 1
        self.last_norm = norm

    # ------------------------------------------------------------------------------------ callbacks
    def sync_public(self) -> TrainerState:
        self.public.step, self.public.max_steps = self.step, self.total
        self.public.epoch = self.epoch + self.position / len(self.loader)
        return self.public

    def step_end(self) -> None:
        """``on_step_end(state, metrics)``: this step's micro-batch means (this process), grad_norm and lr."""
        if not self.per_step:
            return
        n = max(self.step_micro, 1)
        metrics = {k: float(v) / n for k, v in self.step_sums.items()}
        if self.last_norm is not None:
            metrics["grad_norm"] = float(self.last_norm)
        metrics["lr"] = float(self.scheduler.get_last_lr()[0])
        self.step_sums, self.step_micro = {}, 0
        call_back(self.job.callbacks, "on_step_end", self.sync_public(), metrics)

    # ---------------------------------------------------------------------------------- bookkeeping
    def log_window(self) -> dict[str, float]:
        record = {"step": self.step, "epoch": self.epoch + self.position / len(self.loader),
                  **self.window.result(self.acc)}
        record["lr"] = float(self.scheduler.get_last_lr()[0])
        record["nonfinite_skipped"] = self.nonfinite
        self.log.write(record)
        self.acc.log({k: v for k, v in record.items() if k != "step"}, step=self.step)
        self.window = _Window()
        return record

    def after_step(self) -> None:
        """The job's per-step hook; its metrics become a record of this step (its time is not a step's)."""
        began = time.perf_counter()
        extra = self.job.after_step(self.step)
        if extra:
            self.log.write({"step": self.step, **extra})
            self.acc.log(extra, step=self.step)
            call_back(self.job.callbacks, "on_round_end", self.sync_public(), dict(extra))
        self.window.start += time.perf_counter() - began

    def write_eval(self) -> None:
        metrics = evaluate(self.acc, self.model, self.eval_loader, self.job.loss_fn)
        self.log.write({"step": self.step, **metrics})
        self.acc.log(metrics, step=self.step)
        if self.main:
            logger.info("held-out at step %d: %s", self.step, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        self.window.start = time.perf_counter()

    def state(self) -> dict:
        """``trainer_state.json``: where to pick up (the next epoch when this one is used up)."""
        done = self.position >= len(self.loader)
        return {
            "step": self.step,
            "epoch": self.epoch + 1 if done else self.epoch,
            "position": 0 if done else self.position,
            "nonfinite_skipped": self.nonfinite,
            "total_steps": self.total,
            "batch_size": self.args.batch_size,
            "grad_accum": self.args.grad_accum,
            "num_processes": self.acc.num_processes,
        }

    def save(self, with_state: bool = True) -> None:
        flag = torch.tensor(0.0 if all_finite(self.model) else float("nan"), device=self.acc.device)
        if not _finite_everywhere(self.acc, flag):
            raise TrainingError(f"the weights hold NaN/inf at step {self.step}; not saving them")
        path = save_checkpoint(self.acc, self.model, self.job.tokenizer, self.out, self.step, self.state(),
                               self.args.save_total_limit, keep_weights=self.args.keep_checkpoint_weights,
                               with_state=with_state)
        self.last_saved = self.step
        call_back(self.job.callbacks, "on_save", self.sync_public(), Path(path or self.out / f"checkpoint-{self.step}"))
        self.window.start = time.perf_counter()

    def save_final(self) -> Path:
        """``output_dir/final``: the trained weights (LoRA merged) and the tokeniser, via ``save_pretrained``, and
        ``trainer_state.json`` with the step (eval reads it; a resumed run that already ended stops there)."""
        final = self.out / "final"
        net = self.acc.unwrap_model(self.model)
        extra = {STATE_FILE: {**self.state(), "final": True}}
        same = self.out / f"checkpoint-{self.step}"
        if (self.acc.num_processes == 1 and self.last_saved == self.step and not is_peft(net)
                and (same / COMPLETE).is_file()):
            # The last step's checkpoint holds exactly these weights (the demo's runs keep one for evaluation).
            final_from_checkpoint(same, final, extra)
            call_back(self.job.callbacks, "on_save", self.sync_public(), final)
            return final
        state_dict = None
        if is_peft(net):
            net = net.merge_and_unload()  # plain from_pretrained then loads the merged weights
        else:
            state_dict = self.acc.get_state_dict(self.model)  # collective under FSDP / ZeRO-3
        if self.main:
            save_pretrained_atomic(net, self.job.tokenizer, final, state_dict=state_dict, extra=extra)
        self.acc.wait_for_everyone()
        call_back(self.job.callbacks, "on_save", self.sync_public(), final)
        return final


def _can_fold_clip(accelerator: Any, optimizer: torch.optim.Optimizer, params: list) -> Any:
    """The torch optimizer that can apply gradient clipping itself, or None.

    Clipping multiplies every gradient by ``c = min(1, max_norm / (‖g‖ + 1e-6))``: one more pass over all the
    gradients (~5% of a SmolLM2 step on one core). The fused AdamW kernel already reads each gradient once and
    divides it by ``grad_scale`` when one is set (what ``GradScaler`` uses to unscale): ``grad_scale = 1 / c`` is
    the same clip (to one rounding of the quotient). Only for a plain process-local fused AdamW with no loss
    scaler: FSDP, DeepSpeed and XLA clip their own way, and a scaler sets ``grad_scale`` itself."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if (type(inner) is not torch.optim.AdamW or not inner.defaults.get("fused")
            or getattr(accelerator, "scaler", None) is not None
            or str(getattr(accelerator, "distributed_type", "NO")).split(".")[-1] not in ("NO", "MULTI_CPU", "MULTI_GPU")
            or any(type(p.data) is not torch.Tensor for p in params)):
        return None
    return inner


def _clip_scale(params: list, max_norm: float | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(total gradient norm, grad_scale)`` for :func:`_can_fold_clip`'s optimizer: the norm as
    ``clip_grad_norm_`` computes it, and ``1 / c`` when clipping changes anything (None when it does not, or the
    norm is not finite: the caller skips that step)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None, None
    norm = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
    if not max_norm or not bool(torch.isfinite(norm)):
        return norm, None
    coef = max_norm / (norm + 1e-6)
    if float(coef) >= 1.0:
        return norm, None
    return norm, (1.0 / coef).to(torch.float32)


def fit(accelerator: Any, args: TrainArgs, job: Job) -> Path:
    """Train ``job.model`` under ``args``; returns ``output_dir/final`` (model + tokeniser, safetensors; not written
    when ``args.save_final`` is false: the model is then only in memory)."""
    run = _Run(accelerator, args, job)
    if run.ended is not None:
        _end(accelerator, run)
        return run.out / "final"
    finished_before = run.step >= run.total  # resuming a run that had already ended: only re-save final
    run.model.train()
    bar = tqdm(total=run.total, initial=run.step, desc=f"train {run.out.name}",
               disable=not accelerator.is_local_main_process)
    try:
        while run.step < run.total:
            run.sampler.use_epoch(run.epoch)
            loader = accelerator.skip_first_batches(run.loader, run.position) if run.position else run.loader
            for batch in loader:
                run.position += 1
                with accelerator.accumulate(run.model):
                    run.micro_step(batch)
                    if not accelerator.sync_gradients:
                        continue
                    run.update(batch)
                bar.update(1)
                last = run.step == run.total
                if run.step % args.log_every == 0 or last:
                    record = run.log_window()
                    bar.set_postfix({k: f"{record[k]:.3g}" for k in ("loss", "rewards/accuracies") if k in record})
                run.step_end()
                if job.after_step is not None:
                    run.after_step()
                if run.eval_loader is not None and args.eval_every and run.step % args.eval_every == 0 and not last:
                    run.write_eval()
                if args.save_every and run.step % args.save_every == 0 and not last:
                    run.save(with_state=not args.save_only_model)
                if last:
                    break
            else:  # the epoch is used up
                run.epoch, run.position = run.epoch + 1, 0
                continue
            break
    finally:
        bar.close()
    if run.eval_loader is not None and not finished_before:
        run.write_eval()
    keep_state, keep_weights = args.save_final_state, args.keep_checkpoint_weights
    if not args.save_final:  # the caller takes the trained model from memory (train.save_final=false)
        if run.main:
            finish(run.out, keep_state=False, keep_weights=keep_weights)
        _end(accelerator, run)
        return run.out / "final"
    if run.last_saved != run.step and (keep_state or (keep_weights and args.save_every)):
        # The last step's checkpoint: resumable (a later --resume with more steps continues from it) or, for the
        # evaluation of every checkpoint, its weights.
        run.save(with_state=keep_state)
    final = run.save_final()
    if run.main:
        finish(run.out, keep_state=keep_state, keep_weights=keep_weights)
    _end(accelerator, run)
    return final


def _end(accelerator: Any, run: _Run) -> None:
    """End the run on every process together. The prepared (DDP) model's reducer holds the gloo process group: it
    is released here, while every process is still at this barrier, so that ``end_training``'s
    ``destroy_process_group`` tears gloo down with all peers alive. Released later (when ``fit``'s frame goes), a
    process could join gloo's threads after its peer had exited and wait for ever (seen with torchrun, 2 CPU
    processes, about one run in four)."""
    accelerator.wait_for_everyone()
    run.model = run.optimizer = run.loader = run.scheduler = run.eval_loader = None
    accelerator.free_memory()  # accelerate's own references to the prepared objects; runs gc
    accelerator.wait_for_everyone()
    accelerator.end_training()
