"""Held-out reward and ``KL(π_θ ‖ π_sft)`` while a run trains: ``output_dir/eval.jsonl``, one frontier per run.

``exoalign train`` with held-out prompts (``data.eval_file`` or ``data.eval_fraction``) and a judge
(``online.oracle`` or ``online.reward_model``) evaluates the policy before the first step (π_sft, step 0), every
``online.eval_every`` rounds online or ``train.eval_every`` steps offline, and at the end, with ``exoalign eval``'s
code: ``online.eval_samples`` completions per held-out prompt from the policy as it is (the HF sampler with
``exoalign eval``'s seeds, so every evaluation draws with the same random numbers and a point equals what
``exoalign eval`` reports for a checkpoint saved at that step with the same settings), rewards from the judge, and
``log π_θ(y)``, ``log π_sft(y)`` of exactly the sampled ids at the sampling temperature → ``kl`` (k1) and ``kl_k3``
(:mod:`exoalign.eval.kl`), reward mean with its CI (:func:`~exoalign.eval.winrate.mean_ci`).

Each line of ``eval.jsonl`` is an eval JSON of one point (``schema: exoalign.eval/1``, ``settings.sft_model``, a
one-element ``results``); ``exoalign plot frontier output_dir/eval.jsonl`` merges the lines, so π_sft is the
step-0 point and every later evaluation a point of the run's line. ``win_rate`` is null (no independent
baseline samples are drawn during training; ``exoalign eval`` measures it).

Across processes the held-out prompts are split into contiguous shards; each process samples, scores and takes the
log-probs of its own shard, and the main process gathers them and appends the line. A resumed run keeps the lines
up to its checkpoint's step and rewrites the rest.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..rewards import judge_texts
from ..sampling import HFSampler, SamplingSettings
from .evaluate import SCHEMA, completion_logps
from .kl import kl_k1, kl_k3
from .winrate import mean_ci

EVAL_FILE = "eval.jsonl"


def shard(n: int, rank: int, world: int) -> range:
    """Contiguous shard ``rank`` of ``range(n)`` over ``world`` processes (the last ones may be shorter)."""
    size = -(-n // world)  # ceil
    return range(min(rank * size, n), min((rank + 1) * size, n))


def read_points(output_dir: str | Path) -> list[dict]:
    """The lines of ``output_dir/eval.jsonl`` (torn lines skipped)."""
    path = Path(output_dir) / EVAL_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("schema") == SCHEMA and rec.get("results"):
            out.append(rec)
    return out


class HeldOut:
    """Evaluates a policy on the held-out prompts and appends the point to ``output_dir/eval.jsonl``."""

    def __init__(self, *, acc: Any, output_dir: str | Path, prompts: list[str], prompt_ids: list[list[int]],
                 tokenizer: Any, judge: Any, judge_name: str, judge_spec: dict, ref: torch.nn.Module,
                 ref_context: Callable[[], Any] | None, sft_path: str, settings: SamplingSettings,
                 samples_per_prompt: int, batch_size: int, confidence: float = 0.95) -> None:
        self.acc, self.out = acc, Path(output_dir)
        self.path = self.out / EVAL_FILE
        self.run = self.out.resolve().name
        self.prompts, self.prompt_ids, self.tok = prompts, prompt_ids, tokenizer
        self.judge, self.judge_name, self.ref = judge, judge_name, ref
        self.ref_context = ref_context or contextlib.nullcontext
        self.sft_path, self.s, self.n = sft_path, settings, samples_per_prompt
        self.batch_size, self.confidence = batch_size, confidence
        self.settings = {"sft_model": sft_path, "n_prompts": len(prompts), "samples_per_prompt": samples_per_prompt,
                         "kl_temperature": settings.temperature, "backend": "hf", "during_training": True,
                         **settings.sampling_dict(), **judge_spec}

    # ------------------------------------------------------------------------------------ the file
    def reset(self, keep_until: int | None) -> None:
        """Start the file afresh (None) or keep the points up to step ``keep_until`` (a resumed run)."""
        if not self.acc.is_main_process:
            return
        kept = [] if keep_until is None else [p for p in read_points(self.out)
                                               if (p["results"][0].get("step") or 0) <= keep_until]
        if not kept:
            self.path.unlink(missing_ok=True)
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(p) + "\n" for p in kept), encoding="utf-8")
        tmp.replace(self.path)

    def has(self, step: int) -> bool:
        return any(p["results"][0].get("step") == step for p in read_points(self.out))

    # ---------------------------------------------------------------------------------- one point
    @torch.no_grad()
    def _local(self, model: torch.nn.Module) -> dict[str, list]:
        """Samples, rewards and both log-probs of this process's shard of the prompts."""
        idx = list(shard(len(self.prompts), self.acc.process_index, self.acc.num_processes))
        if not idx:
            return {"rewards": [], "pi": [], "sft": [], "length": [], "finished": []}
        pids = [self.prompt_ids[i] for i in idx]
        was = model.training
        model.eval()
        sampler = HFSampler(model, self.tok, self.s, stream="policy")  # exoalign eval's stream for a checkpoint
        groups = []
        for s in range(0, len(idx), self.s.batch_size):
            groups += sampler.generate(pids[s : s + self.s.batch_size], idx[s : s + self.s.batch_size], self.n)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        kw = {"temperature": self.s.temperature, "batch_size": self.batch_size, "pad_id": pad}
        lp_pi = completion_logps(model, pids, groups, **kw)  # (n_shard, n)
        with self.ref_context():
            lp_ref = completion_logps(self.ref, pids, groups, **kw)  # (n_shard, n)
        model.train(was)
        flat = judge_texts(self.judge, [self.prompts[i] for i in idx for _ in range(self.n)],
                           [c.text for g in groups for c in g], self.s.batch_size * self.n, self.judge_name)
        rewards = np.asarray(flat, dtype=np.float64).reshape(len(idx), self.n)
        return {"rewards": rewards.tolist(), "pi": lp_pi.tolist(), "sft": lp_ref.tolist(),
                "length": [len(c.ids) for g in groups for c in g],
                "finished": [c.finished for g in groups for c in g]}

    def __call__(self, model: torch.nn.Module, step: int) -> dict[str, Any] | None:
        """Evaluate ``model`` (unwrapped) at ``step`` on every process; the main process writes the point and
        returns its result (others None)."""
        local = self._local(model)
        parts = [local]
        if self.acc.num_processes > 1:
            from accelerate.utils import gather_object

            parts = gather_object([local])  # in process order: contiguous shards concatenate in prompt order
        if not self.acc.is_main_process:
            return None
        cat = {k: [v for p in parts for v in p[k]] for k in local}
        rewards, pi, sft = (np.asarray(cat[k], dtype=np.float64) for k in ("rewards", "pi", "sft"))  # (n_prompts, n)
        k1, k3 = kl_k1(pi, sft), kl_k3(pi, sft)
        sft_point = step == 0
        result = {
            "checkpoint": self.sft_path if sft_point else str(self.out / f"checkpoint-{step}"),
            "name": "π_sft" if sft_point else f"{self.run}/step-{step}", "run": self.run, "step": step,
            "n_prompts": len(self.prompts), "samples_per_prompt": self.n,
            "reward": mean_ci(rewards, self.confidence).to_dict(),
            "kl": k1.mean, "kl_se": k1.se, "kl_k3": k3.mean, "kl_k3_se": k3.se, "win_rate": None,
            "length": float(np.mean(cat["length"])), "finished": float(np.mean(cat["finished"])),
        }
        line = {"schema": SCHEMA, "run": self.run, "complete": True, "confidence": self.confidence,
                "settings": self.settings, "baseline": None, "results": [result]}
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line, allow_nan=True) + "\n")
            f.flush()
        return result


def metrics_of(result: dict[str, Any]) -> dict[str, float]:
    """The point as ``heldout/*`` metrics (reward, KL k1 and k3, length) for metrics.jsonl and the trackers."""
    return {"heldout/reward": result["reward"]["mean"], "heldout/kl": result["kl"], "heldout/kl_k3": result["kl_k3"],
            "heldout/length": result["length"]}
