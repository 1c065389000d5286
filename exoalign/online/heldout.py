"""Held-out reward and KL while ``exoalign train`` runs, online and offline (``exoalign.eval.heldout`` computes and
writes the points; this module picks the prompts, builds the evaluator from the run's config and schedules it)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

from ..data import encode_prompts
from ..errors import ConfigError
from ..eval.heldout import HeldOut
from ..rewards import JudgeSettings, make_judge
from ..sampling import SamplingSettings, load_prompts
from ..train.checkpoint import STATE_FILE, list_checkpoints
from ..train.config import TrainConfig
from ..train.engine import finished_state
from ..train.prepare import load_reference
from ..train.step import is_peft, unwrap


def resume_step(resume_from: Path | None, out: Path, resume: bool) -> int:
    """The step a (resumed) run starts from: its last checkpoint's, a run that ended's, else 0."""
    if resume_from is not None:
        return int(json.loads((resume_from / STATE_FILE).read_text(encoding="utf-8"))["step"])
    ended = finished_state(out) if resume else None
    return ended["step"] if ended else 0


def heldout_prompts(prompts: list[str], cfg: TrainConfig, tokenizer: Any) -> tuple[list[str], list[str]]:
    """``(training prompts, held-out prompts)``: data.eval_file's prompts, or a seeded data.eval_fraction of the
    training prompts (held out of training)."""
    d = cfg.data
    if d.eval_file:
        return prompts, load_prompts(d.eval_file, split=d.split, tokenizer=tokenizer, dedupe=True, limit=None,
                                     columns=d.columns, preset=d.preset)
    if d.eval_fraction <= 0:
        return prompts, []
    order = list(range(len(prompts)))
    random.Random(cfg.train.seed).shuffle(order)
    n = max(1, int(round(d.eval_fraction * len(prompts))))
    if n >= len(prompts):
        raise ConfigError(f"holding out {n} of the {len(prompts)} prompts leaves none to train on",
                          file=d.train_file, field="data.eval_fraction", fix="give more prompts or lower it")
    held = set(order[:n])
    return [p for i, p in enumerate(prompts) if i not in held], [prompts[i] for i in sorted(held)]


def make_heldout(cfg: TrainConfig, acc: Any, out: Path, prompts: list[str], tokenizer: Any, judge: Any,
                 model: torch.nn.Module, ref: torch.nn.Module, source: str) -> HeldOut:
    """The held-out evaluator of a run (online's sampling settings and judge; π_sft = ``ref``)."""
    on, d = cfg.online, cfg.data
    settings = SamplingSettings(temperature=on.temperature, top_k=0, top_p=1.0, max_new_tokens=on.max_new_tokens,
                                min_new_tokens=0, max_prompt_length=d.max_prompt_length, seed=cfg.train.seed,
                                batch_size=on.generation_batch_size, backend="hf")
    lora_base = ref is model and is_peft(model)
    return HeldOut(acc=acc, output_dir=out, prompts=prompts,
                   prompt_ids=encode_prompts(tokenizer, prompts, d.max_prompt_length),  # as exoalign eval
                   tokenizer=tokenizer, judge=judge,
                   judge_name=f"oracle {on.oracle}" if on.oracle else f"reward model {on.reward_model}",
                   judge_spec={"oracle": on.oracle, "reward_model": on.reward_model}, ref=ref,
                   ref_context=(lambda: unwrap(model).disable_adapter()) if lora_base else None,
                   sft_path=cfg.model.ref_name_or_path or source, settings=settings,
                   samples_per_prompt=on.eval_samples, batch_size=cfg.train.ref_batch_size or cfg.train.batch_size)


def start_heldout(heldout: HeldOut, model: torch.nn.Module, resumed_step: int | None) -> None:
    """Before training: π_sft's point (step 0), unless a resumed run has it already; later points are dropped."""
    heldout.reset(keep_until=resumed_step)
    heldout.acc.wait_for_everyone()
    if not heldout.has(0):
        heldout(model, 0)
    heldout.acc.wait_for_everyone()


class OfflineHeldOut:
    """Offline runs with held-out rows and a judge (online.oracle / online.reward_model): reward and
    KL(π_θ‖π_sft) on the held-out prompts at step 0, every train.eval_every steps and at the end, into
    output_dir/eval.jsonl. The loop calls it after each step (``Job.after_step``); ``train`` calls
    :meth:`at_end` after the final save."""

    def __init__(self, heldout: HeldOut, model: torch.nn.Module, every: int) -> None:
        self.heldout, self.model, self.every = heldout, model, every

    def __call__(self, step: int) -> None:
        if self.every and step % self.every == 0:
            self.heldout(self.model, step)

    def at_end(self, model: torch.nn.Module) -> None:
        ended = finished_state(self.heldout.out)
        if ended is not None and not self.heldout.has(ended["step"]):
            self.heldout(model, ended["step"])


def offline_heldout(cfg: TrainConfig, acc: Any, out: Path, eval_rows: list[dict], tokenizer: Any,
                    model: torch.nn.Module, ref_model: torch.nn.Module | None, source: str) -> OfflineHeldOut:
    """The held-out evaluator of an offline ``exoalign train`` (``train.trainer`` names it in ``HELDOUT_ENTRY``);
    π_sft's point is evaluated here, before the loop starts (or kept, when resuming)."""
    on, args = cfg.online, cfg.train
    if ref_model is None:  # the cached reference mode keeps no π_sft in memory: the KL needs one
        lora_base = is_peft(model) and cfg.model.ref_name_or_path is None
        ref_model = model if lora_base else load_reference(cfg, cfg.model.ref_name_or_path or source).to(acc.device)
    judge = make_judge(JudgeSettings(oracle=on.oracle, reward_model=on.reward_model), device=str(acc.device))
    prompts = list(dict.fromkeys(r["prompt"] for r in eval_rows))
    heldout = make_heldout(cfg, acc, out, prompts, tokenizer, judge, model, ref_model, source)
    found = list_checkpoints(out, warn=False) if args.resume else []
    step = resume_step(found[-1][1] if found else None, out, args.resume)
    start_heldout(heldout, model, step if args.resume else None)
    return OfflineHeldOut(heldout, model, args.eval_every)
