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
from collections.abc import Callable, Iterator, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm
from transformers import get_scheduler

from ..config import save_config, to_dict
from ..errors import ConfigError
from .checkpoint import (
    all_finite,
    last_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    save_pretrained_atomic,
)
from .config import TrainArgs
from .step import is_peft

logger = logging.getLogger(__name__)

LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN/inf loss under ``nan_policy=stop``); the CLI prints it and exits 1."""


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


class EpochSampler(Sampler[int]):
    """A fresh permutation of ``range(n)`` per epoch, seeded by ``(seed, epoch)``: reproducible and resumable."""

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class _Window:
    """Metrics since the last log: per-micro-batch ones and per-step ones (grad_norm), averaged separately, then
    reduced across processes when the window is logged."""

    def __init__(self) -> None:
        self.micro: dict[str, torch.Tensor] = {}
        self.per_step: dict[str, torch.Tensor] = {}
        self.micro_count = 0
        self.step_count = 0
        self.steps = 0
        self.tokens = 0.0
        self.start = time.perf_counter()

    @staticmethod
    def _acc(into: dict[str, torch.Tensor], metrics: dict[str, torch.Tensor]) -> None:
        for k, v in metrics.items():
            v = v.detach().float()
            into[k] = into[k] + v if k in into else v.clone()

    def add_micro(self, metrics: dict[str, torch.Tensor], tokens: float) -> None:
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
        tokens = torch.tensor([self.tokens], device=device)
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
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
        tmp.replace(self.path)

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


def fit(accelerator: Any, args: TrainArgs, job: Job) -> Path:
    """Train ``job.model`` under ``args``; returns ``output_dir/final`` (model + tokeniser, safetensors)."""
    out = Path(args.output_dir)
    main = accelerator.is_main_process
    resume_from = last_checkpoint(out) if args.resume else None
    if args.resume and resume_from is None and main:
        logger.warning("train.resume is set but %s has no complete checkpoint: starting from step 0", out)
    if not args.resume and list_checkpoints(out, warn=False):
        raise ConfigError(
            f"{out} already holds checkpoints of an earlier run",
            field="train.output_dir",
            fix="pass --resume (train.resume=true) to continue it, or choose another output_dir",
        )
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if job.config is not None:
            save_config(job.config, out / "config.yaml")
        (out / "run_info.json").write_text(json.dumps(job.info, indent=2, default=str) + "\n", encoding="utf-8")

    if len(job.train_data) == 0:
        raise ConfigError("the training data has no rows", field="data.train_file", fix="give a file with rows")
    sampler = EpochSampler(len(job.train_data), args.seed)
    train_dl = DataLoader(job.train_data, batch_size=args.batch_size, sampler=sampler, collate_fn=job.collate)
    params = [p for p in job.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    model, optimizer, train_dl = accelerator.prepare(job.model, optimizer, train_dl)
    total = _plan(args, len(train_dl))
    scheduler = get_scheduler(args.scheduler, optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=total)
    scheduler = accelerator.prepare(scheduler)
    eval_dl = None
    if job.eval_data is not None and len(job.eval_data) > 0:
        eval_dl = accelerator.prepare(DataLoader(job.eval_data, batch_size=args.batch_size, collate_fn=job.collate))

    step, epoch, position, nonfinite = 0, 0, 0, 0
    log = MetricsLog(out / "metrics.jsonl", main)
    if resume_from is not None:
        state = load_checkpoint(accelerator, resume_from)
        step, epoch, position = state["step"], state["epoch"], state["position"]
        nonfinite = state.get("nonfinite_skipped", 0)
        if main:
            logger.info("resuming from %s (step %d)", resume_from, step)
        log.reset(keep_until=step)
    else:
        log.reset(keep_until=None)
    if args.report_to:
        accelerator.init_trackers(args.project_name, config=_flat_config(job.config))

    def checkpoint_state() -> dict:
        done = position >= len(train_dl)
        return {
            "step": step,
            "epoch": epoch + 1 if done else epoch,
            "position": 0 if done else position,
            "nonfinite_skipped": nonfinite,
            "total_steps": total,
            "batch_size": args.batch_size,
            "grad_accum": args.grad_accum,
            "num_processes": accelerator.num_processes,
        }

    def write_eval(at_step: int) -> None:
        metrics = evaluate(accelerator, model, eval_dl, job.loss_fn)
        log.write({"step": at_step, **metrics})
        accelerator.log(metrics, step=at_step)
        if main:
            logger.info("held-out at step %d: %s", at_step, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def save(at_step: int) -> None:
        if not _finite_everywhere(accelerator, torch.tensor(0.0 if all_finite(model) else float("nan"))):
            raise TrainingError(f"the weights hold NaN/inf at step {at_step}; not saving them")
        save_checkpoint(accelerator, model, job.tokenizer, out, at_step, checkpoint_state(), args.save_total_limit)

    model.train()
    window = _Window()
    bar = tqdm(total=total, initial=step, desc=f"train {out.name}", disable=not accelerator.is_local_main_process)
    last_saved = step if resume_from is not None else -1
    while step < total:
        sampler.set_epoch(epoch)
        loader = accelerator.skip_first_batches(train_dl, position) if position else train_dl
        for batch in loader:
            position += 1
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    loss, metrics = job.loss_fn(model, batch)
                if not _finite_everywhere(accelerator, loss):
                    if args.nan_policy == "stop":
                        raise TrainingError(_nan_message(f"the loss is {float(loss)}", step, args, batch))
                    # Still run backward (with a zero loss) so every process joins the gradient all-reduce.
                    nonfinite += 1
                    loss = torch.where(torch.isfinite(loss), loss, torch.zeros_like(loss))
                    metrics = {k: v for k, v in metrics.items() if bool(torch.isfinite(v).all())}
                accelerator.backward(loss)
                window.add_micro(metrics, float(batch["attention_mask"].sum()))
                if not accelerator.sync_gradients:
                    continue
                norm = accelerator.clip_grad_norm_(params, args.max_grad_norm or float("inf"))
                if norm is not None and not _finite_everywhere(accelerator, torch.as_tensor(norm)):
                    if args.nan_policy == "stop":
                        raise TrainingError(_nan_message("the gradient norm is not finite", step, args, batch))
                    nonfinite += 1  # skip the update: the weights stay as they were
                else:
                    optimizer.step()
                    scheduler.step()
                    if norm is not None:
                        window.add_step({"grad_norm": torch.as_tensor(norm)})
                optimizer.zero_grad(set_to_none=True)
            step += 1
            window.steps += 1
            bar.update(1)
            if step % args.log_every == 0 or step == total:
                record = {"step": step, "epoch": epoch + position / len(train_dl), **window.result(accelerator)}
                record["lr"] = float(scheduler.get_last_lr()[0])
                record["nonfinite_skipped"] = nonfinite
                log.write(record)
                accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
                bar.set_postfix({k: f"{record[k]:.3g}" for k in ("loss", "rewards/accuracies") if k in record})
                window = _Window()
            if eval_dl is not None and args.eval_every and step % args.eval_every == 0 and step != total:
                write_eval(step)
                window.start = time.perf_counter()
            if args.save_every and step % args.save_every == 0 and step != total:
                save(step)
                last_saved = step
                window.start = time.perf_counter()
            if step >= total:
                break
        else:
            epoch, position = epoch + 1, 0
            continue
        break
    bar.close()

    if eval_dl is not None:
        write_eval(step)
    if last_saved != step:
        save(step)
    final = out / "final"
    net = accelerator.unwrap_model(model)
    state_dict = None
    if is_peft(net):
        net = net.merge_and_unload()  # plain from_pretrained loads the merged weights
    else:
        state_dict = accelerator.get_state_dict(model)  # collective under FSDP / ZeRO-3
    if main:
        save_pretrained_atomic(net, job.tokenizer, final, state_dict=state_dict)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final
