"""``exoalign eval``: mean reward, ``KL(π_θ ‖ π_sft)`` and win rate of each checkpoint, written as JSON.

    exoalign eval checkpoints=[runs/exo] sft_model=runs/sft/final prompts=data/test_prompts.jsonl \\
        reward_model=runs/rm/final output=results/exo.json temperature=0.8

For each checkpoint (a model directory; a training ``output_dir`` expands to its complete ``checkpoint-*``
directories and ``final``, in step order; each result records the ``run`` it belongs to, so one JSON can hold
several runs, e.g. the SFT model and the EXO and DPO runs of one experiment):

1. sample ``samples_per_prompt`` completions for every held-out prompt from the checkpoint (same settings and
   seeds for every checkpoint, so checkpoints are compared on common random numbers);
2. score them with the judge (reward model or oracle) → mean reward with a confidence interval;
3. compute ``log π_θ(y)`` and ``log π_sft(y)`` of the sampled token ids at temperature ``kl_temperature``
   (default: the sampling temperature) → ``kl`` (the authors' estimator ``mean ℓ``) and ``kl_k3``
   (``mean (ρ − 1) − log ρ``), see :mod:`exoalign.eval.kl`;
4. win rate against the baseline policy's samples (``baseline``, default the SFT model; drawn once from an
   independent random stream), ties counted half, with a prompt-bootstrap CI, see :mod:`exoalign.eval.winrate`.

Output JSON (``schema: exoalign.eval/1``)::

    {"schema": "exoalign.eval/1", "run": str, "complete": bool, "confidence": 0.95,
     "settings": {...what the numbers depend on; a rerun must match it to resume...},
     "baseline": {"model": str, "reward": {"mean", "ci_low", "ci_high"}, "rewards": [[float]]} | null,
     "results": [{"checkpoint": path, "name": str, "run": str, "step": int | null, "n_prompts": int,
                  "samples_per_prompt": int, "reward": {"mean", "ci_low", "ci_high"},
                  "kl": float, "kl_se": float, "kl_k3": float, "kl_k3_se": float,
                  "win_rate": {"mean", "ci_low", "ci_high", "wins", "ties", "losses"} | null,
                  "length": float (mean completion tokens), "finished": float (fraction ending in EOS)}],
     "timings": {"setup_s": float, "baseline": {...}, name: {"load_s", "generation_s", "kl_s", "score_s", "total_s"}}}

What does not depend on the checkpoint is computed once per process (π_sft, its prompt KV caches for the KL pass,
its own samples): see :mod:`exoalign.eval.reference` and docs/pipeline.md.

The JSON is rewritten atomically after the baseline and after every checkpoint; a rerun with the same settings
skips the checkpoints already in it (``overwrite=true`` starts afresh). With ``save_samples`` each
checkpoint's samples go to ``<output stem>.samples/<name>.jsonl`` as group rows with ``rewards``, ``logps``,
``ref_logps`` and ``lengths`` (sampled tokens per completion).
"""

from __future__ import annotations

import gc
import json
import os
import re
import sys
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..attention import use_decode_attention
from ..config import require, stage_args, to_dict
from ..data import encode_prompts, get_preset, parse_columns, write_rows
from ..errors import ConfigError, InputError
from ..fileio import atomic_json, fingerprint
from ..hardware import keep_freed_memory
from ..logprobs import IGNORE, sequence_logps
from ..models import DTYPES, check_model_dir, load_causal_lm, load_tokenizer, rebuild_causal_lm
from ..rewards import JudgeSettings, check_judge_given, judge_texts, make_judge
from ..sampling import (
    Completion,
    Sampler,
    SamplingSettings,
    build_sampler,
    load_prompts,
    pack_linears,
    pick_device,
    resolve_backend,
    sampling_copy,
    summed_logps,
)
from .kl import kl_k1, kl_k3
from .reference import PrefixCachedLogps
from .winrate import mean_ci, win_rate

SCHEMA = "exoalign.eval/1"


@dataclass
class EvalConfig(JudgeSettings, SamplingSettings):
    """``exoalign eval``: reward, KL(π_θ‖π_sft) and win rate of checkpoints on held-out prompts."""

    checkpoints: list[str] = field(default_factory=list)
    """Policies to evaluate: model directories or hub names; a training output_dir expands to its checkpoints."""
    sft_model: str = ""
    """π_sft: the reference of the KL (directory, hub name or smollm2) and the default baseline of the win rate."""
    tokenizer: str | None = None
    """Tokeniser shared by all models; defaults to sft_model."""
    prompts: str = ""
    """Held-out prompts (any rows with a 'prompt' or 'messages' field)."""
    split: str = "train"
    """Split to read from a hub dataset or a DatasetDict directory (e.g. test)."""
    preset: str | None = None
    """The prompts' published schema, read as it is (hh-rlhf, ultrafeedback, ...: see docs/data.md)."""
    columns: dict[str, Any] | str | None = None
    """Map the source's fields onto ours, e.g. {prompt: instruction} (see docs/data.md)."""
    max_prompts: int | None = None
    """Use only the first this many distinct prompts; null = all."""
    dedupe: bool = True
    """Evaluate each distinct prompt once."""
    samples_per_prompt: int = 1
    """Completions sampled per prompt and checkpoint (more = tighter KL and reward estimates)."""
    batch_size: int = 16
    """Prompts per generation batch (each expands to samples_per_prompt rows); does not change the samples."""
    baseline: str | None = None
    """Policy the win rate is measured against; null = sft_model."""
    win_rate: bool = True
    """Compute the win rate against the baseline (samples the baseline once)."""
    kl_temperature: float | None = None
    """Temperature of the log-probs in the KL estimators; null = the sampling temperature."""
    logp_batch_size: int = 16
    """Sequences per forward pass when computing log-probs (π_θ's, when the sampler does not report them)."""
    kl_prefix_cache_mb: int = 1024
    """π_sft's prompt KV caches kept for the KL pass of later checkpoints in this process (MiB); 0 = keep none."""
    confidence: float = 0.95
    """Level of the confidence intervals."""
    n_bootstrap: int = 1000
    """Bootstrap resamples for the win-rate interval."""
    output: str = ""
    """Output JSON file (rewritten after each checkpoint; resumed when rerun with the same settings)."""
    run_name: str | None = None
    """Name of this run in plots and tables; null = the output file's stem."""
    save_samples: bool = True
    """Also write each checkpoint's samples, rewards and log-probs to <output stem>.samples/<name>.jsonl."""
    gpu_memory_utilization: float = 0.5
    """vLLM only: fraction of GPU memory for the vLLM engine (π_sft and the policy stay on the GPU for log-probs)."""
    dtype: str = "float32"
    """Weights dtype of the policies and π_sft: float32, bfloat16, float16 or auto."""
    device: str = "auto"
    """auto (CUDA when available), cpu, cuda or cuda:N."""
    trust_remote_code: bool = False
    """Allow model code from the hub (only for models you trust)."""
    overwrite: bool = False
    """Start afresh instead of resuming an existing output."""

    def __post_init__(self) -> None:
        self.check_sampling()
        self.check_judge()
        self.columns = parse_columns(self.columns, "columns")
        if self.preset:
            get_preset(self.preset, "preset")
        require(self.samples_per_prompt >= 1, "samples_per_prompt", "must be >= 1", "use e.g. 1 or 4")
        require(self.kl_temperature is None or self.kl_temperature > 0, "kl_temperature", "must be > 0",
                "use null (= temperature) or e.g. 1.0")
        require(self.logp_batch_size >= 1, "logp_batch_size", "must be >= 1", "use e.g. 16")
        require(self.kl_prefix_cache_mb >= 0, "kl_prefix_cache_mb", "must be >= 0", "use e.g. 1024 (0 keeps none)")
        require(0 < self.confidence < 1, "confidence", "must be in (0, 1)", "use e.g. 0.95")
        require(self.n_bootstrap >= 100, "n_bootstrap", "must be >= 100", "use e.g. 1000")
        require(self.max_prompts is None or self.max_prompts >= 2, "max_prompts", "must be >= 2 (a CI needs 2)",
                "use null for all")
        require(self.dtype in DTYPES, "dtype", f"unknown dtype {self.dtype!r}", f"use one of {', '.join(DTYPES)}")


# ------------------------------------------------------------------------------------- checkpoints
@dataclass
class Checkpoint:
    name: str
    """Label in the JSON and tables: ``<run>/<checkpoint dir>``."""
    path: str
    step: int | None
    run: str
    """The training run it belongs to (its output_dir's name): one line per run in the frontier plot."""


_CKPT_DIR = re.compile(r"^(checkpoint-\d+|final)$")


def expand_checkpoints(paths: list[str], in_memory: Collection[str] = ()) -> list[Checkpoint]:
    """Model directories to evaluate. A directory without ``config.json`` is read as a training output_dir:
    its complete ``checkpoint-{step}`` directories (torn ones skipped) and ``final``, oldest first. A path in
    ``in_memory`` names a model the caller holds (see :func:`run`): it is taken as it is, and need not exist."""
    from ..train.checkpoint import COMPLETE, list_checkpoints

    out: list[Checkpoint] = []
    for p in paths:
        path = Path(p)
        if p in in_memory:
            out.append(_named(p))
        elif path.is_dir() and not (path / "config.json").is_file():
            run = path.resolve().name
            found = [Checkpoint(f"{run}/{d.name}", str(d), step, run) for step, d in list_checkpoints(path)]
            final = path / "final"
            if (final / "config.json").is_file() and (final / COMPLETE).exists():
                found.append(Checkpoint(f"{run}/final", str(final), _state_step(final), run))
            if not found:
                raise InputError("no model here: neither config.json nor complete checkpoint-*/final directories",
                                 file=p, field="checkpoints", fix="give model directories or a training output_dir")
            out.extend(found)
        elif path.exists() and not path.is_dir():
            raise InputError("a checkpoint must be a model directory", file=p, field="checkpoints",
                             fix="give the directory that holds config.json")
        elif path.is_dir():
            out.append(_named(p))
        else:  # a hub name
            out.append(Checkpoint(p, p, None, p))
    names = [c.name for c in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise InputError(f"two checkpoints are both named {dup!r}", field="checkpoints",
                         fix="give each checkpoint once (or rename the run directories)")
    return out


def _named(p: str) -> Checkpoint:
    """A model directory as a checkpoint: runs/x/checkpoint-40 belongs to run x (step 40); any other model directory
    is a run of its own (its step from ``trainer_state.json``, if any)."""
    path = Path(p)
    run = path.resolve().parent.name if _CKPT_DIR.match(path.name) else path.name
    m = re.match(r"^checkpoint-(\d+)$", path.name)
    step = int(m.group(1)) if m else _state_step(path)
    return Checkpoint(f"{run}/{path.name}" if _CKPT_DIR.match(path.name) else path.name, p, step, run)


def _state_step(path: Path) -> int | None:
    """The step recorded by the trainer in ``trainer_state.json``, if any."""
    try:
        return int(json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ------------------------------------------------------------------------------------ computation
def sample_all(sampler: Sampler, prompt_ids: list[list[int]], n: int, batch_size: int, desc: str,
               on_batch: Callable[[list[list[int]], list[list[Completion]]], None] | None = None,
               clock: dict[str, float] | None = None) -> list[list[Completion]]:
    """``n`` completions for every prompt, in batches of ``batch_size`` prompts, with a progress bar.

    ``on_batch(prompt_ids, groups)`` runs after each batch is drawn (eval's KL pass, on the same batch);
    ``clock["generation_s"]`` / ``clock["on_batch_s"]`` accumulate the seconds of each part.
    """
    groups: list[list[Completion]] = []
    clock = clock if clock is not None else {}
    with tqdm(total=len(prompt_ids), desc=desc, unit="prompt", leave=False) as bar:
        for start in range(0, len(prompt_ids), batch_size):
            idx = list(range(start, min(start + batch_size, len(prompt_ids))))
            batch = [prompt_ids[i] for i in idx]
            t0 = time.perf_counter()
            drawn = sampler.generate(batch, idx, n)
            clock["generation_s"] = clock.get("generation_s", 0.0) + time.perf_counter() - t0
            groups.extend(drawn)
            if on_batch is not None:
                t0 = time.perf_counter()
                on_batch(batch, drawn)
                clock["on_batch_s"] = clock.get("on_batch_s", 0.0) + time.perf_counter() - t0
            bar.update(len(idx))
    return groups


@torch.no_grad()
def completion_logps(
    model: torch.nn.Module, prompt_ids: list[list[int]], groups: list[list[Completion]], *,
    temperature: float, batch_size: int, pad_id: int,
) -> np.ndarray:
    """``log π(y|x)`` of every sampled completion's token ids at ``temperature``: ``[n_prompts, n]``.

    Rows are laid out as ``sequence_logps`` expects: prompt left-padded, completion right-padded, labels
    ``-100`` outside the completion (EOS, when sampled, is part of the completion).
    """
    device = next(model.parameters()).device
    pairs = [(p, c.ids) for p, g in zip(prompt_ids, groups) for c in g]
    out: list[float] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        P = max(len(p) for p, _ in chunk)
        C = max(len(c) for _, c in chunk)
        ids = torch.full((len(chunk), P + C), pad_id, dtype=torch.long)  # (b, P + C)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, IGNORE)
        for r, (p, c) in enumerate(chunk):
            ids[r, P - len(p) : P] = torch.tensor(p)
            ids[r, P : P + len(c)] = torch.tensor(c)
            mask[r, P - len(p) : P + len(c)] = 1
            labels[r, P : P + len(c)] = torch.tensor(c)
        logps, _ = sequence_logps(model, ids.to(device), mask.to(device), labels.to(device), temperature=temperature)
        out.extend(logps.double().tolist())
    n = len(groups[0]) if groups else 0
    return np.asarray(out, dtype=np.float64).reshape(len(groups), n)


def _close(sampler: Sampler) -> None:
    """Shut down a vLLM engine (the HF sampler holds only a model the caller manages)."""
    close = getattr(sampler, "close", None)
    if close is not None:
        close()


def _free() -> None:
    """Return GPU memory of models the caller just dropped (a vLLM engine is not freed by refcounts alone).
    On a CPU, dropping the last reference already frees a model; a full gc pass would only cost time."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ state
def _save(path: Path, state: dict) -> None:
    """Rewrite the eval JSON atomically (temp file + rename): a kill never leaves half a JSON."""
    atomic_json(path, state)


def _load_state(path: Path, settings: dict, overwrite: bool) -> dict | None:
    if overwrite or not path.exists():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InputError("the existing output is not an eval JSON, so it cannot be resumed", file=str(path),
                         field="output", fix="choose another output or pass overwrite=true") from None
    if not isinstance(state, dict) or state.get("schema") != SCHEMA:
        raise InputError("the existing output is not an eval JSON", file=str(path), field="output",
                         fix="choose another output or pass overwrite=true")
    if state.get("settings") != settings:
        old = state.get("settings") or {}
        changed = sorted(k for k in set(settings) | set(old) if old.get(k) != settings.get(k))
        raise ConfigError(f"was written with other settings ({', '.join(changed)})", file=str(path), field="output",
                          fix="rerun with the same settings to resume, pass overwrite=true, or choose a new output")
    return state


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "model"


# -------------------------------------------------------------------------------------------- run
@dataclass
class _KeptSft:
    """π_sft and what is computed from it alone, kept per process for as long as the same π_sft is evaluated."""

    model: torch.nn.Module
    copies: dict[str, torch.nn.Module] = field(default_factory=dict)
    """π_sft converted to a ``sample_dtype`` (sampling and the KL pass of the models in that dtype), made once."""
    ref: dict[tuple, PrefixCachedLogps] = field(default_factory=dict)
    """The KL pass with π_sft's prompt KV caches, per (dtype, temperature, pad id)."""
    own: dict[str, Any] = field(default_factory=dict)
    """π_sft's own samples, their rewards and log-probs, keyed by everything they depend on (settings, prompts,
    judge, random stream): the baseline and π_sft as a checkpoint are drawn and scored once per process."""


_SFT_KEPT: dict[tuple, _KeptSft] = {}


def _kept_sft(session: _Session) -> _KeptSft:
    """π_sft, loaded once per process: a driver that evaluates several runs in one process (the demo's eval
    workers) pays its load once. Only the last one is kept; eval never changes its weights."""
    cfg = session.cfg
    path = Path(cfg.sft_model)
    stamp = max((f.stat().st_mtime_ns for f in path.iterdir() if f.is_file()), default=0) if path.is_dir() else 0
    key = (os.path.abspath(cfg.sft_model), stamp, cfg.dtype, str(session.device), cfg.trust_remote_code)
    if key not in _SFT_KEPT:
        _SFT_KEPT.clear()
        _SFT_KEPT[key] = _KeptSft(session.load(cfg.sft_model))
    return _SFT_KEPT[key]


@dataclass
class _Session:
    """What every checkpoint's evaluation shares: prompts, tokeniser, judge and the π_sft model."""

    cfg: EvalConfig
    tokenizer: Any
    prompts: list[str]
    prompt_ids: list[list[int]]
    judge: Any
    judge_name: str
    device: torch.device
    backend: str
    kl_temperature: float
    kept: _KeptSft | None = None
    own_key: str = ""
    """What π_sft's own samples depend on besides the model (settings, prompts, judge): their cache key."""
    in_memory: Mapping[str, torch.nn.Module] = field(default_factory=dict)
    """Checkpoints the caller holds, by path (:func:`run`'s ``models``)."""

    @property
    def sft(self) -> torch.nn.Module:
        assert self.kept is not None
        return self.kept.model

    def load(self, path: str, dtype: str = "model") -> torch.nn.Module:
        """A model in the eval's ``dtype`` (or in ``dtype`` when it names one)."""
        cfg = self.cfg
        want = cfg.dtype if dtype == "model" else dtype
        held = self.in_memory.get(path)
        if held is not None:  # the caller's weights in a model built as if loaded from `path` (no copy in fp32)
            fresh = rebuild_causal_lm(held).to(self.device).eval().requires_grad_(False)
            return fresh if want == "model" else sampling_copy(fresh, want)
        model = load_causal_lm(path, dtype=want, trust_remote_code=cfg.trust_remote_code).to(self.device).eval()
        model.requires_grad_(False)  # only sampled and scored here
        if want == "bfloat16":  # as a sampling copy: the decode attention (CPU) and oneDNN's weight layout
            use_decode_attention(model)
        pack_linears(model)  # bf16 on CPU: weights in oneDNN's layout once; else nothing
        return model

    def is_sft(self, path: str) -> bool:
        return os.path.normpath(path) == os.path.normpath(self.cfg.sft_model)

    def sample(self, path: str, stream: str, model: torch.nn.Module | None, desc: str,
               on_batch: Callable | None = None, clock: dict[str, float] | None = None,
               kept: PrefixCachedLogps | None = None) -> list[list[Completion]]:
        """``samples_per_prompt`` completions per prompt from ``path`` (HF reuses ``model`` when given). The
        sampler takes its prompts' prefill from ``kept``'s caches (π_sft's KL pass for π_sft's own samples), the
        same computation, when it samples from the very model they are computed on."""
        cfg = self.cfg
        if kept is None and self.backend == "hf" and self.is_sft(path):
            kept = self.ref_pass()
        sampler = build_sampler(cfg, path, self.tokenizer, dtype=cfg.dtype, device=cfg.device,
                                trust_remote_code=cfg.trust_remote_code, stream=stream, model=model,
                                prompt_caches=kept)
        groups = sample_all(sampler, self.prompt_ids, cfg.samples_per_prompt, cfg.batch_size, desc, on_batch, clock)
        _close(sampler)
        del sampler
        _free()
        return groups

    def sampler_scores_policy(self) -> bool:
        """The HF sampler's reported log-probs are ``log π_θ`` at ``kl_temperature`` (it samples from the policy's
        weights in ``sample_dtype`` at that temperature and reports log-probs before min_new_tokens / top-k /
        top-p), so in fp32 the policy's forward pass of the KL can be skipped (in bf16 it cannot:
        :meth:`policy_pass`). The KL is then measured on the models in ``sample_dtype`` (:meth:`measured_dtype`)."""
        cfg = self.cfg
        return (self.backend == "hf" and self.kl_temperature == cfg.temperature
                and cfg.shared_prefill and cfg.kv_cache == "dynamic")

    def policy_pass(self, policy: torch.nn.Module | None) -> bool:
        """Whether π_θ's log-probs of its samples come from the KL pass's computation (:class:`PrefixCachedLogps`
        on π_θ, its prompts' caches taken from the sampler's prefill) rather than from the sampler: when π_θ is
        measured in a reduced precision (bf16, fp16). The sampler's log-probs then come from its decode, whose
        rounding differs from the KL pass's by ~0.06 nats a token; on the sampler's own draws that difference does
        not average out but adds KL(decode ‖ pass), 0.05-0.11 nats at 24 tokens with SmolLM2 (a copy of π_sft
        measured 0.05-0.09 instead of 0). One computation for both models gives the fp32 reference within its
        error, and a copy of π_sft exactly 0 (docs/pipeline.md, ``tests/test_eval_cache.py``). In fp32 the two
        computations agree to ~1e-6 and the sampler's numbers are used."""
        return (self.backend == "hf" and policy is not None and self.sampler_scores_policy()
                and next(policy.parameters()).dtype != torch.float32)

    def measured_dtype(self) -> str:
        """The dtype of the models whose samples and KL are measured: ``sample_dtype`` when the sampler's log-probs
        are the policy's (π_sft's pass then runs on its own copy in that dtype, so ``KL(π_θ ‖ π_sft)`` is the one
        between the two converted models, and π_θ = π_sft still gives exactly 0); else the loaded models'."""
        return self.cfg.sample_dtype if self.sampler_scores_policy() else "model"

    def sft_as_measured(self) -> torch.nn.Module:
        """π_sft in :meth:`measured_dtype` (itself, or a copy made once per process)."""
        assert self.kept is not None
        dtype = self.measured_dtype()
        if dtype not in self.kept.copies:
            self.kept.copies[dtype] = sampling_copy(self.sft, dtype)
        return self.kept.copies[dtype]

    def ref_pass(self) -> PrefixCachedLogps:
        """π_sft's KL pass, with its prompt KV caches kept across the checkpoints and eval calls of this process."""
        assert self.kept is not None
        tok = self.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        key = (self.measured_dtype(), self.kl_temperature, pad_id)
        if key not in self.kept.ref:
            self.kept.ref[key] = PrefixCachedLogps(self.sft_as_measured(), pad_id, self.kl_temperature,
                                                   budget_mb=self.cfg.kl_prefix_cache_mb)
        return self.kept.ref[key]

    def rewards(self, groups: list[list[Completion]]) -> np.ndarray:
        """Judge rewards ``[n_prompts, samples_per_prompt]``."""
        texts = [c.text for g in groups for c in g]
        flat_prompts = [p for p, g in zip(self.prompts, groups) for _ in g]
        r = judge_texts(self.judge, flat_prompts, texts, self.cfg.judge_batch_size, self.judge_name)
        return np.asarray(r, dtype=np.float64).reshape(len(groups), -1)

    def baseline(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The baseline's samples (own random stream) scored once: what every checkpoint's win rate uses; and its
        timings. π_sft as the baseline is drawn once per process (:class:`_KeptSft`)."""
        assert self.kept is not None
        t0, clock = time.perf_counter(), {}
        path = self.cfg.baseline or self.cfg.sft_model
        own = f"baseline {self.own_key}" if self.is_sft(path) else None
        if own is not None and own in self.kept.own:
            return dict(self.kept.own[own]), {"cached": True, "total_s": time.perf_counter() - t0}
        groups = self.sample(path, "baseline", self.sft_as_measured() if self.is_sft(path) else None, "baseline",
                             clock=clock)
        r = self.rewards(groups)
        out = {"model": path, "reward": mean_ci(r, self.cfg.confidence).to_dict(), "rewards": r.tolist()}
        if own is not None:
            self.kept.own[own] = dict(out)
        return out, {"cached": False, "generation_s": clock.get("generation_s", 0.0),
                     "total_s": time.perf_counter() - t0}

    def _draw(self, ckpt: Checkpoint, clock: dict[str, float]) -> tuple[list[list[Completion]], np.ndarray, np.ndarray]:
        """A checkpoint's samples, ``log π_θ`` and ``log π_sft`` of them ``[n_prompts, n]``; π_sft's KL pass runs
        batch by batch right after each generation batch, on the prompt KV caches it keeps."""
        cfg = self.cfg
        is_sft = self.is_sft(ckpt.path)
        policy = self.sft_as_measured() if is_sft else None
        if self.backend == "hf" and policy is None:
            t0 = time.perf_counter()
            policy = self.load(ckpt.path, self.measured_dtype())  # only sampled (and scored by the sampler) then
            clock["load_s"] = time.perf_counter() - t0
        parts: list[np.ndarray] = []
        own_parts: list[np.ndarray] = []  # π_θ's log-probs from the KL pass's computation (policy_pass)
        on_batch: Callable | None = None
        own: PrefixCachedLogps | None = None
        if not is_sft:
            ref = self.ref_pass()
            if self.policy_pass(policy):
                assert policy is not None
                own = PrefixCachedLogps(policy, ref.pad_id, self.kl_temperature)

            def kl_pass(batch: list[list[int]], drawn: list[list[Completion]]) -> None:
                completions = [[c.ids for c in g] for g in drawn]
                parts.append(ref(batch, completions))
                if own is not None:
                    own_parts.append(own(batch, completions))
                    own.release(batch)  # the sampler's prefill of this batch, kept for this pass only

            on_batch = kl_pass
        groups = self.sample(ckpt.path, "policy", policy, ckpt.name, on_batch, clock, kept=own)
        clock["kl_s"] = clock.pop("on_batch_s", 0.0)
        if policy is None:  # vLLM sampled; the log-probs still come from the HF model
            policy = self.load(ckpt.path)
        t0 = time.perf_counter()
        reported = summed_logps(groups) if self.sampler_scores_policy() and own is None else None
        if own is not None:
            lp_pi = np.concatenate(own_parts, 0)  # (n_prompts, n)
        elif reported is not None:
            lp_pi = np.asarray(reported, dtype=np.float64)  # (n_prompts, n)
        else:
            pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
            lp_pi = completion_logps(policy, self.prompt_ids, groups, temperature=self.kl_temperature,
                                     batch_size=cfg.logp_batch_size, pad_id=pad_id)  # (n_prompts, n)
        clock["kl_s"] += time.perf_counter() - t0
        lp_ref = lp_pi if is_sft else np.concatenate(parts, 0)  # (n_prompts, n)
        del policy
        _free()
        return groups, lp_pi, lp_ref

    def evaluate(self, ckpt: Checkpoint, r_base: np.ndarray | None) -> tuple[dict[str, Any], list[dict], dict]:
        """The result entry of one checkpoint, its samples as rows for ``save_samples``, and its timings (seconds:
        ``load_s``, ``generation_s``, ``kl_s``, ``score_s``, ``total_s``; ``cached`` when π_sft's own samples were
        taken from earlier in the process)."""
        assert self.kept is not None
        cfg = self.cfg
        t_start, clock = time.perf_counter(), {}
        own = f"policy {self.own_key}" if self.is_sft(ckpt.path) else None
        if own is not None and own in self.kept.own:
            groups, lp_pi, lp_ref, rewards = self.kept.own[own]
            clock["cached"] = True
        else:
            groups, lp_pi, lp_ref = self._draw(ckpt, clock)
            t0 = time.perf_counter()
            rewards = self.rewards(groups)  # (n_prompts, n)
            clock["score_s"] = time.perf_counter() - t0
            if own is not None:
                self.kept.own[own] = (groups, lp_pi, lp_ref, rewards)
        k1, k3 = kl_k1(lp_pi, lp_ref), kl_k3(lp_pi, lp_ref)
        result: dict[str, Any] = {
            "checkpoint": ckpt.path, "name": ckpt.name, "run": ckpt.run, "step": ckpt.step,
            "n_prompts": len(self.prompts), "samples_per_prompt": cfg.samples_per_prompt,
            "reward": mean_ci(rewards, cfg.confidence).to_dict(),
            "kl": k1.mean, "kl_se": k1.se, "kl_k3": k3.mean, "kl_k3_se": k3.se, "win_rate": None,
            "length": float(np.mean([len(c.ids) for g in groups for c in g])),
            "finished": float(np.mean([c.finished for g in groups for c in g])),
        }
        if r_base is not None:
            result["win_rate"] = win_rate(rewards, r_base, confidence=cfg.confidence, n_boot=cfg.n_bootstrap,
                                          seed=cfg.seed).to_dict()
        rows = [{"prompt": p, "completions": [c.text for c in g], "rewards": r.tolist(), "logps": a.tolist(),
                 "ref_logps": b.tolist(), "lengths": [len(c.ids) for c in g]}
                for p, g, r, a, b in zip(self.prompts, groups, rewards, lp_pi, lp_ref)]
        clock["total_s"] = time.perf_counter() - t_start
        return result, rows, clock


def _check_runnable(cfg: EvalConfig) -> None:
    require(bool(cfg.checkpoints), "checkpoints", "no checkpoints given", "set checkpoints=[dir1, dir2] (or a run dir)")
    for name, what in (("sft_model", "the SFT model directory"), ("prompts", "a held-out prompt file"),
                       ("output", "a .json path")):
        require(bool(getattr(cfg, name)), name, "not set", f"set {name}=… to {what}")
    require(Path(cfg.output).suffix == ".json", "output", "must be a .json file", "name it e.g. results/exo.json")
    check_judge_given(cfg)


def run(cfg: EvalConfig, models: Mapping[str, torch.nn.Module] | None = None) -> Path:
    """Evaluate every checkpoint of ``cfg`` and write the JSON (see the module docstring).

    ``models``: checkpoints the caller already holds, keyed by the path ``cfg.checkpoints`` names them by (which
    need not exist: e.g. ``runs/exo/checkpoint-200`` for a run's last step kept in memory, as the demo does). They
    are sampled as if loaded from that path in the eval's dtype: the weights go into a model built afresh from the
    model's config (:func:`~exoalign.models.rebuild_causal_lm`: none of what training patched into the module; in
    fp32 the tensors are shared, not copied), as ``from_pretrained`` builds it from the directory. HF backend
    only."""
    _check_runnable(cfg)
    models = dict(models or {})
    out = Path(cfg.output)
    checkpoints = expand_checkpoints(cfg.checkpoints, in_memory=models)
    # Every model is checked before any work, so a bad one cannot stop the run after the baseline was written.
    for ckpt in checkpoints:
        if ckpt.path not in models:
            check_model_dir(ckpt.path, "checkpoints")
    check_model_dir(cfg.sft_model, "sft_model")
    if cfg.baseline:
        check_model_dir(cfg.baseline, "baseline")
    if cfg.reward_model:
        check_model_dir(cfg.reward_model, "reward_model")
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.sft_model, trust_remote_code=cfg.trust_remote_code,
                               padding_side="left")
    prompts = load_prompts(cfg.prompts, split=cfg.split, tokenizer=tokenizer, dedupe=cfg.dedupe, limit=cfg.max_prompts,
                           columns=cfg.columns, preset=cfg.preset)
    if len(prompts) < 2:
        raise InputError(f"only {len(prompts)} distinct prompt(s)", file=cfg.prompts, field="prompts",
                         fix="give at least 2 prompts (intervals need them; a few hundred are typical)")
    backend = resolve_backend(cfg.backend)
    if models and backend != "hf":
        raise ConfigError("models held in memory can only be sampled by the HF backend", field="backend",
                          fix="use backend=hf, or save the models and name their directories in checkpoints")
    T_kl = cfg.kl_temperature or cfg.temperature
    settings = {
        "sft_model": cfg.sft_model, "prompts": fingerprint(prompts), "n_prompts": len(prompts),
        "samples_per_prompt": cfg.samples_per_prompt, "backend": backend, "kl_temperature": T_kl,
        "baseline": (cfg.baseline or cfg.sft_model) if cfg.win_rate else None, **cfg.sampling_dict(),
        **cfg.judge_spec(),
    }
    state = _load_state(out, settings, cfg.overwrite) or {
        "schema": SCHEMA, "run": cfg.run_name or out.stem, "complete": False, "confidence": cfg.confidence,
        "settings": settings, "config": None, "baseline": None, "results": [],
    }
    state["config"] = to_dict(cfg)  # a resumed run may list more checkpoints than the first one did
    done = {r["checkpoint"] for r in state["results"]}
    todo = [c for c in checkpoints if c.path not in done]
    if not todo and (state["baseline"] is not None or not cfg.win_rate):
        print(f"{out}: all {len(checkpoints)} checkpoints already evaluated", file=sys.stderr)
        state["complete"] = True
        _save(out, state)
        return out

    t_setup = time.perf_counter()
    session = _Session(
        cfg=cfg, tokenizer=tokenizer, prompts=prompts,
        prompt_ids=encode_prompts(tokenizer, prompts, cfg.max_prompt_length),
        judge=make_judge(cfg, dtype=cfg.dtype, device=cfg.device, trust_remote_code=cfg.trust_remote_code),
        judge_name=f"oracle {cfg.oracle}" if cfg.oracle else f"reward model {cfg.reward_model}",
        device=pick_device(cfg.device), backend=backend, kl_temperature=T_kl,
        own_key=json.dumps(settings, sort_keys=True), in_memory=models,
    )
    session.kept = _kept_sft(session)
    keep_freed_memory(device=session.device)  # checkpoints' decode and KL pass reuse the heap on CPU (hardware.py)
    timings = state.setdefault("timings", {})
    timings["setup_s"] = time.perf_counter() - t_setup  # tokeniser, prompts, judge, π_sft (unless kept)
    if cfg.win_rate and state["baseline"] is None:
        state["baseline"], timings["baseline"] = session.baseline()
        _save(out, state)
    r_base = np.asarray(state["baseline"]["rewards"], dtype=np.float64) if cfg.win_rate else None
    for ckpt in tqdm(todo, desc="eval", unit="checkpoint"):
        result, rows, timings[ckpt.name] = session.evaluate(ckpt, r_base)
        if cfg.save_samples:
            write_rows(out.with_name(out.stem + ".samples") / f"{_safe(ckpt.name)}.jsonl", rows)
        state["results"].append(result)
        _save(out, state)  # after every checkpoint: a rerun resumes with the next one
    state["complete"] = True
    _save(out, state)
    return out


def main(argv: list[str] | None = None) -> int:
    cfg = stage_args("exoalign eval", EvalConfig, argv, description=__doc__.split("\n\n")[0])
    path = run(cfg)
    state = json.loads(path.read_text(encoding="utf-8"))
    for r in state["results"]:
        wr = r["win_rate"]["mean"] if r["win_rate"] else float("nan")
        print(f"{r['name']}: reward {r['reward']['mean']:.4f}  kl {r['kl']:.4f}  kl_k3 {r['kl_k3']:.4f}  "
              f"win_rate {wr:.3f}")
    print(f"wrote {path}")
    return 0
