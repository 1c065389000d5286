"""``exoalign demo``: EXO vs DPO on controlled sentiment generation, offline, on a CPU.

    exoalign demo [--quick] [--model smollm2|scratch|DIR] [--out DIR] [--device cpu|cuda] [--seed N] [key=value ...]

The paper's IMDB experiment (Ji et al., ICML 2024, §5.1: steer a language model to write positive movie
reviews; reward = a sentiment judge) run by the library's own stages, each reading and writing files in
``DIR`` (default ``./exoalign-demo``); see ``docs/demo.md``:

1. ``corpus``  (scratch only) synthetic movie reviews from a stochastic grammar (:mod:`exoalign.demo.reviews`);
2. ``sft``     π_sft: a real model as it is (``smollm2``, resolved by :mod:`exoalign.zoo`), or for
   ``model=scratch`` a small GPT-2 trained from scratch on the grammar (``exoalign sft``);
3. ``prompts`` training and held-out prompts: openings of other reviews, each distinct (inside the chat
   template after an instruction, or raw: ``prompt_format``);
4. ``sample``  K completions per training prompt from π_sft (``exoalign sample``);
5. ``score``   rewards from the oracle, VADER sentiment of the completion (``exoalign score``);
6. ``label``   best-vs-worst preference pairs from the scored groups (``exoalign label``);
7. ``train``   one run per method and β_π on the same samples with the same budget (``exoalign train``);
8. ``eval``    π_sft and every checkpoint on the held-out prompts, same prompts and random streams for all:
   oracle reward and ``KL(π‖π_sft)`` (``exoalign eval``); stages 7 and 8 share one pool of worker processes,
   a run's evaluation starting as soon as its training ends (:func:`exoalign.demo.jobs.run_jobs`);
9. ``report``  the frontiers (envelopes over checkpoints and β), a paired-bootstrap verdict, examples.

A stage is skipped when its outputs exist and were made with the same settings (a fingerprint of the settings
it depends on, chained through the stages before it), so a second run, or a run after an interruption, only
does what is missing; each (method, β_π) run has its own fingerprint, so adding a β value runs only the new
runs. (The device is not part of the fingerprint: results made on the CPU are reused by a ``--device cuda``
run in the same directory.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..fileio import atomic_json
from . import reviews
from .jobs import Job, one_thread, run_jobs, start_worker_server, usable_cores
from .settings import (  # noqa: F401 (re-exported)
    FULL_SEEDS,
    METHODS,
    OFFLINE_METHODS,
    OMIT_AT_DEFAULT,
    ONLINE_LOSSES,
    ONLINE_METHODS,
    QUICK_SCRATCH,
    STAGE_KEYS,
    DemoSettings,
    method_name,
    preset,
    run_name,
    stage_keys,
)

N_STAGES = 9
REF_BATCH_SIZE = 16
"""Groups per pass, at least, of the runs' passes without gradients (``train.ref_batch_size``; a larger training
batch keeps its own size): a run's reference log-probs (on CPU the 16–36 groups its steps read, in 1–3 passes
instead of 8–12) and an online round's end metrics."""


# ------------------------------------------------------------------------------------------ stages
class Demo:
    """The demo's directory, settings and stages; :meth:`run` does what is not done yet."""

    def __init__(self, out: Path, settings: DemoSettings, device: str, work: Path | None = None) -> None:
        """``out`` keeps the small files (data, evaluations, stage markers, the report); ``work`` (default
        ``out``) the large ones: the toy's π_sft, the runs' checkpoints, the reference cache and the logs."""
        self.out, self.s, self.device = out, settings.for_device(device), device
        self.work = work or out
        self.data = out / "data"
        self.sft_dir = self.work / "sft"
        self.runs = self.work / "runs"
        self.evals = out / "eval"
        self.marks = out / ".stages"
        self.timings: dict[str, dict[str, Any]] = {}
        self.stage_walls: dict[str, float] = {}
        """Wall seconds of each pool of jobs run by this invocation (``parallel``), e.g. ``train + eval``."""
        self.started = time.perf_counter()

    @property
    def sft_model(self) -> str:
        """π_sft's directory: the toy's SFT output, or the real model's local directory."""
        if self.s.scratch:
            return str(self.sft_dir / "final")
        from ..zoo import resolve_model_path

        return resolve_model_path(self.s.model)

    def run_list(self) -> list[tuple[str, str, float]]:
        """``(run name, method, β_π)`` of every run, rw and pref runs alternating: the two jobs that start
        together then compute the two reference log-prob caches (scored groups, pairs) that all later runs read."""
        rw = [m for m in self.s.methods if m.endswith("-rw")]
        other = [m for m in self.s.methods if not m.endswith("-rw")]
        order = [m for pair in zip(rw, other) for m in pair] + rw[len(other):] + other[len(rw):]
        offline = [m for m in order if m not in ONLINE_METHODS]
        online = [(run_name(m, self.s.online_beta_pi), m, self.s.online_beta_pi) for m in order if m in ONLINE_METHODS]
        return online + [(run_name(m, b), m, b) for b in self.s.beta_pi for m in offline]

    def train_fp(self, stage_fp: str, method: str, beta_pi: float) -> str:
        """One run's fingerprint: the train stage's, the method and β_π (and the online settings for online runs)."""
        if method in ONLINE_METHODS:
            s = self.s
            reuse = () if s.online_reuse == 1 else (s.online_reuse,)  # runs made before it existed keep theirs
            return self.job_fp(stage_fp, method, beta_pi, s.online_rounds, s.online_steps_per_round, *reuse)
        return self.job_fp(stage_fp, method, beta_pi)

    def eval_steps(self, method: str) -> list[int]:
        """The steps of a run that are evaluated: every save_every-th and the last."""
        total = self.steps(method)
        return sorted(set(range(self.s.save_every, total + 1, self.s.save_every)) | {total})

    # -- bookkeeping
    def fingerprints(self) -> dict[str, str]:
        """Chained fingerprints: a change of a setting changes the fingerprint of its stage and all later ones."""
        prev, out = "exoalign-demo/2", {}
        values = dataclasses.asdict(self.s)
        defaults = dataclasses.asdict(DemoSettings())
        for stage, keys in stage_keys(self.s.scratch).items():
            used = {k: values[k] for k in keys if not (k in OMIT_AT_DEFAULT and values[k] == defaults[k])}
            blob = json.dumps([prev, stage, used], sort_keys=True)
            prev = out[stage] = hashlib.sha256(blob.encode()).hexdigest()[:16]
        return out

    @staticmethod
    def job_fp(stage_fp: str, *parts: Any) -> str:
        """Fingerprint of one job of a stage (one run's training or evaluation)."""
        return hashlib.sha256(json.dumps([stage_fp, *parts]).encode()).hexdigest()[:16]

    def _mark(self, stage: str) -> Path:
        return self.marks / f"{stage}.json"

    def is_done(self, stage: str, fp: str, outputs: list[Path]) -> bool:
        """Stage ``stage`` finished with fingerprint ``fp`` and its outputs are still there."""
        try:
            same = json.loads(self._mark(stage).read_text(encoding="utf-8"))["fingerprint"] == fp
        except (OSError, ValueError, KeyError):
            return False
        return same and all(p.exists() for p in outputs)

    def _clear(self, outputs: list[Path]) -> None:
        """Remove a stage's outputs left by a run with other settings, or by an interrupted stage that cannot
        resume: the stage starts afresh."""
        for p in outputs:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()

    def _done(self, name: str, fp: str, seconds: float, cpu: float, extra: dict | None = None) -> None:
        """Mark stage ``name`` done; its wall and CPU seconds (and a job's start-up overheads) go into the marker and
        the timings."""
        record = {"fingerprint": fp, "seconds": seconds, "cpu_seconds": cpu, "device": self.device}
        if extra is not None:
            record["overheads"] = self.overheads(name, extra)
        atomic_json(self._mark(name), record)
        self.timings[name] = {"seconds": seconds, "cpu_seconds": cpu, "cached": False}
        if extra is not None:
            self.timings[name]["overheads"] = record["overheads"]

    def _done_parts(self, name: str, fp: str, also: list[tuple], seconds: float, cpu: float, extra: dict) -> None:
        """Mark job ``name`` done, and the jobs it did ``also`` (each with the seconds of its part: ``parts`` in
        ``extra``; the process start goes with the first part)."""
        parts = extra.pop("parts", None)
        if not also or not parts:
            self._done(name, fp, seconds, cpu, extra)
            return
        self._done(name, fp, *parts[name], extra)
        for other, other_fp, _ in also:
            self._done(other, other_fp, *parts[other], {})

    def overheads(self, name: str, extra: dict) -> dict[str, Any]:
        """Where job ``name`` spent its time outside its steps (seconds): ``process_start_s`` (a worker's start
        before its first job: little when forked from the preloaded server, see :mod:`exoalign.demo.jobs`); a
        training's ``setup_s`` / ``load_s`` / ``reference_s`` (``run_info.json``'s ``startup``) and
        ``first_step_s``; an evaluation's ``setup_s`` and per checkpoint ``generation_s`` / ``total_s`` (the eval
        JSON's ``timings``)."""
        out = {k: v for k, v in extra.items() if v is not None}
        kind, run = name.split(" ", 1)
        try:
            if kind == "train":
                info = json.loads((self.runs / run / "run_info.json").read_text(encoding="utf-8"))
                out.update(info.get("startup") or {})
                steps = [json.loads(line) for line in (self.runs / run / "metrics.jsonl").open(encoding="utf-8")]
                out["first_step_s"] = next((r["perf/step_s"] for r in steps if "perf/step_s" in r), None)
            elif kind == "eval":
                t = json.loads((self.evals / f"{run}.json").read_text(encoding="utf-8")).get("timings") or {}
                out["setup_s"] = t.get("setup_s")
                out["checkpoints"] = {k: {"generation_s": v.get("generation_s"), "total_s": v.get("total_s")}
                                      for k, v in t.items() if isinstance(v, dict) and k != "baseline"}
        except (OSError, ValueError, KeyError):  # a job that leaves no such files (or older ones)
            pass
        return out

    def _cached(self, header: str, name: str) -> None:
        try:
            mark = json.loads(self._mark(name).read_text(encoding="utf-8"))
        except (OSError, ValueError):  # a run evaluated elsewhere whose training marker did not travel
            mark = {"seconds": float("nan")}
        print(f"{header}: cached ({mark['seconds']:.1f} s when it ran)", file=sys.stderr)
        self.timings[name] = {"seconds": mark["seconds"], "cpu_seconds": mark.get("cpu_seconds"), "cached": True}
        if "overheads" in mark:
            self.timings[name]["overheads"] = mark["overheads"]

    def stage(self, n: int, name: str, fp: str, outputs: list[Path], work: Callable[[], None]) -> None:
        """Run ``work`` unless stage ``name`` is done with fingerprint ``fp``; time it; mark it done."""
        header = f"[{n}/{N_STAGES}] {name}"
        if self.is_done(name, fp, outputs):
            self._cached(header, name)
            return
        print(f"{header} ...", file=sys.stderr)
        self._clear(outputs)
        t0, c0 = time.perf_counter(), time.process_time()
        work()
        took = time.perf_counter() - t0
        self._done(name, fp, took, time.process_time() - c0)
        print(f"{header}: done in {took:.1f} s", file=sys.stderr)

    # -- the stages
    def corpus(self) -> None:
        from ..data import write_rows

        s = self.s
        sft_rows = reviews.prompt_rows(reviews.generate_reviews(s.n_sft_reviews, seed=s.seed), seed=s.seed)
        write_rows(self.data / "sft.jsonl", sft_rows)

    def model_info(self) -> None:
        """π_sft's name, directory and parameter count, for results.json (a real model: converted on first use)."""
        from ..models import load_causal_lm

        path = self.sft_model
        model = load_causal_lm(path)
        n = sum(p.numel() for p in model.parameters())
        self.data.mkdir(parents=True, exist_ok=True)
        info = {"name": self.s.model, "path": path, "parameters": n, "model_type": model.config.model_type}
        (self.data / "model.json").write_text(json.dumps(info, indent=1), encoding="utf-8")

    def prompts(self) -> None:
        from ..data import write_rows

        s = self.s
        n_prompts = s.n_train_prompts + s.n_eval_prompts
        # Prompts come from reviews π_sft never saw (their completions are dropped), each prompt once: short
        # prefixes repeat ("I watched The"), and the stages would sample a repeated prompt only once.
        prompts: list[str] = []
        rng_seed = s.seed + 1
        while len(prompts) < n_prompts:
            more = reviews.prompt_rows(reviews.generate_reviews(2 * n_prompts, seed=rng_seed), seed=rng_seed)
            prompts = list(dict.fromkeys(prompts + [r["prompt"] for r in more]))
            rng_seed += 7919
        rows = [self.prompt_row(p) for p in prompts[:n_prompts]]
        write_rows(self.data / "train_prompts.jsonl", rows[: s.n_train_prompts])
        write_rows(self.data / "eval_prompts.jsonl", rows[s.n_train_prompts:])

    def prompt_row(self, opening: str) -> dict[str, Any]:
        """A prompt row: the bare opening (toy, raw) or a chat turn the stages render with the chat template."""
        if self.s.scratch or self.s.prompt_format == "raw":
            return {"prompt": opening}
        return {"messages": [{"role": "user", "content": self.s.instruction + opening}]}

    def _train_args(self, **kw: Any) -> Any:
        from ..train.config import TrainArgs

        # Checkpoints keep their weights for the evaluation, and only them: a run the demo did not finish is trained
        # again from its start (train.resume is off), so no checkpoint's optimizer state is ever read. Passes without
        # gradients (reference log-probs, an online round's end metrics) take at least REF_BATCH_SIZE groups at a
        # time: under bf16 autocast each pass casts every weight, whatever its batch.
        return TrainArgs(seed=self.s.seed, cpu=self.device == "cpu", log_every=1,
                         ref_cache_dir=str(self.work / "cache"), keep_checkpoint_weights=True, save_only_model=True,
                         ref_batch_size=max(REF_BATCH_SIZE, kw.get("batch_size", 1)), **kw)

    def sft(self) -> None:
        from ..stages.sft import SFTConfig, sft
        from ..train.config import DataBaseConfig, ModelConfig

        s = self.s
        cfg = SFTConfig(
            model=ModelConfig(init="scratch", model_type="gpt2", vocab_size=s.vocab_size,
                              scratch_config={"n_layer": s.n_layer, "n_embd": s.n_embd, "n_head": s.n_head}),
            data=DataBaseConfig(train_file=str(self.data / "sft.jsonl"), max_length=s.max_length,
                                max_prompt_length=s.max_prompt_length),
            train=self._train_args(output_dir=str(self.sft_dir), lr=s.sft_lr, batch_size=s.sft_batch_size,
                                   max_steps=s.sft_steps, warmup_steps=max(1, s.sft_steps // 20),
                                   scheduler="cosine"),
        )
        sft(cfg)
        self.model_info()

    def sample(self) -> None:
        import torch

        from ..stages.sample import SampleConfig, run

        s = self.s
        threads = torch.get_num_threads()
        if not s.scratch:  # the only job running, on a real model's large matmuls: every core helps
            torch.set_num_threads(max(1, s.workers or usable_cores()))
        try:
            run(SampleConfig(model=self.sft_model, prompts=str(self.data / "train_prompts.jsonl"),
                             output=str(self.data / "groups.jsonl"), k=s.k, temperature=s.temperature,
                             max_new_tokens=s.max_new_tokens, min_new_tokens=1, seed=s.seed,
                             max_prompt_length=s.max_prompt_length, batch_size=s.gen_batch_size, device=self.device,
                             sample_dtype=self.sample_dtype))
        finally:
            torch.set_num_threads(threads)

    def score(self) -> None:
        from ..stages.score import ScoreConfig, run

        run(ScoreConfig(input=str(self.data / "groups.jsonl"), output=str(self.data / "scored.jsonl"),
                        oracle=reviews.ORACLE, device=self.device))

    def label(self) -> None:
        from ..stages.label import LabelConfig, run

        run(LabelConfig(input=str(self.data / "scored.jsonl"), output=str(self.data / "pairs.jsonl"),
                        method="best_worst"))

    def steps(self, method: str) -> int:
        """Optimizer steps of one run of ``method``."""
        s = self.s
        return s.online_rounds * s.online_steps_per_round if method in ONLINE_METHODS else s.align_steps

    def train(self, method: str, beta_pi: float, in_memory: bool = False) -> Any:
        """One alignment run of ``method`` at ``beta_pi`` into ``runs/<run name>``. ``in_memory`` (offline runs): the
        last step's weights are returned instead of written (unless keep_checkpoints), for :meth:`evaluate` in the
        same process; the checkpoints of earlier evaluated steps are written as usual."""
        from ..train.config import DataConfig, LossConfig, ModelConfig, TrainConfig
        from ..train.trainer import Trainer

        s = self.s
        if method in ONLINE_METHODS:
            return self.train_online(method, beta_pi)
        loss, target = method.split("-", 1)
        data = self.data / ("pairs.jsonl" if target == "pref" else "scored.jsonl")
        cfg = TrainConfig(
            model=ModelConfig(name_or_path=self.sft_model),
            data=DataConfig(train_file=str(data), max_length=s.max_length, max_prompt_length=s.max_prompt_length,
                            k=2 if target == "pref" else None),
            loss=LossConfig(name=loss, target=target, beta_pi=beta_pi, beta_r=s.beta_r, eps=s.eps),
            train=self._train_args(output_dir=str(self.runs / run_name(method, beta_pi)), lr=s.align_lr,
                                   batch_size=s.align_batch_size, max_steps=s.align_steps,
                                   warmup_steps=max(1, min(10, s.align_steps // 10)),
                                   scheduler="constant_with_warmup", save_every=s.save_every,
                                   prefix_sharing=not s.scratch,  # one prompt pass per group (exact)
                                   mixed_precision="no" if s.mixed_precision == "fp32" else s.mixed_precision,
                                   save_final=not in_memory or s.keep_checkpoints),
        )
        _, model = Trainer(config=cfg).run()
        prune(self.runs / run_name(method, beta_pi))
        return model if in_memory else None

    def train_online(self, method: str, beta_pi: float) -> None:
        """An online run (``exoalign train`` with ``online.rounds``): each round samples K completions of
        align_batch_size training prompts from the current policy, scores them with the oracle and takes
        online_steps_per_round steps on them (each group used online_reuse times) with the loss of
        ``ONLINE_LOSSES[method]``: importance-corrected EXO or DPO targets, RLOO or PPO."""
        from ..train.config import DataConfig, LossConfig, ModelConfig, OnlineConfig, TrainConfig
        from ..train.loop import train

        s = self.s
        cfg = TrainConfig(
            model=ModelConfig(name_or_path=self.sft_model),
            data=DataConfig(train_file=str(self.data / "train_prompts.jsonl"), max_length=s.max_length,
                            max_prompt_length=s.max_prompt_length),
            loss=LossConfig(name=ONLINE_LOSSES[method], target="rw", beta_pi=beta_pi,
                            beta_r=s.beta_r, temperature=s.temperature),
            online=OnlineConfig(rounds=s.online_rounds, k=s.k, prompts_per_round=s.align_batch_size,
                                steps_per_round=s.online_steps_per_round, max_new_tokens=s.max_new_tokens,
                                temperature=s.temperature, oracle=reviews.ORACLE, generation_batch_size=s.gen_batch_size,
                                sample_dtype=self.sample_dtype),
            train=self._train_args(output_dir=str(self.runs / run_name(method, beta_pi)), lr=s.align_lr,
                                   batch_size=s.align_batch_size * s.online_reuse // s.online_steps_per_round,
                                   save_every=s.save_every, warmup_steps=1, scheduler="constant_with_warmup",
                                   prefix_sharing=not s.scratch,
                                   mixed_precision="no" if s.mixed_precision == "fp32" else s.mixed_precision),
        )
        train(cfg)
        prune(self.runs / run_name(method, beta_pi))

    def checkpoints(self, name: str) -> list[Path]:
        """Every saved checkpoint of run ``name`` in step order; ``sft`` is π_sft alone (step 0 of every run)."""
        if name == "sft":
            return [Path(self.sft_model)]
        run = self.runs / name
        steps = sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*") if (p / "COMPLETE").is_file())
        # Every save_every-th step and the last: the weights-only checkpoints keep_checkpoint_weights leaves.
        return [run / f"checkpoint-{k}" for k in steps if k % self.s.save_every == 0 or k == steps[-1]]

    def trained(self, name: str, method: str) -> bool:
        """Every checkpoint the evaluation of run ``name`` reads is on disk."""
        return all((self.runs / name / f"checkpoint-{k}" / "COMPLETE").is_file() for k in self.eval_steps(method))

    def drop_checkpoints(self, name: str) -> None:
        """Delete an evaluated run's weights (its metrics and config stay); unless keep_checkpoints."""
        if self.s.keep_checkpoints or name == "sft":
            return
        for path in [*self.runs.joinpath(name).glob("checkpoint-*"), self.runs / name / "final",
                     self.runs / name / "online"]:
            shutil.rmtree(path, ignore_errors=True)

    def evaluate(self, name: str, last: Any = None, method: str | None = None) -> None:
        """``exoalign eval`` of run ``name``'s checkpoints. π_sft is evaluated once, as run ``sft``, and the
        report puts it at step 0 of every run; every evaluation draws its samples from the same seeds (the
        completion j of held-out prompt i has the same random stream for every checkpoint). ``last``: the weights
        of the last step of ``method``'s run, held in memory (:meth:`train` with ``in_memory``), evaluated as its
        checkpoint without reading it from disk."""
        from ..eval.evaluate import EvalConfig, run

        s = self.s
        paths = [str(p) for p in self.checkpoints(name)]
        models = {}
        if last is not None:
            assert method is not None
            steps = self.eval_steps(method)
            paths = [str(self.runs / name / f"checkpoint-{k}") for k in steps]
            models = {paths[-1]: last}
        run(EvalConfig(checkpoints=paths, sft_model=self.sft_model,
                       prompts=str(self.data / "eval_prompts.jsonl"), oracle=reviews.ORACLE,
                       samples_per_prompt=s.eval_samples, temperature=s.temperature, max_new_tokens=s.max_new_tokens,
                       max_prompt_length=s.max_prompt_length, min_new_tokens=1, seed=s.seed + 1000,
                       batch_size=s.gen_batch_size, win_rate=False, output=str(self.evals / f"{name}.json"),
                       run_name=name, device=self.device, logp_batch_size=64, sample_dtype=self.sample_dtype),
            models=models)

    @property
    def sample_dtype(self) -> str:
        """The sampling dtype of the sample stage and the evaluation: the setting for a real model; the toy samples
        its own fp32 weights (a 1M-parameter model gains nothing from bf16)."""
        return "model" if self.s.scratch else self.s.sample_dtype

    # -- the whole chain
    def run(self) -> dict[str, Any]:
        self.started = time.perf_counter()
        if self.device != "cuda" and (self.s.workers or usable_cores()) > 1:
            start_worker_server()  # its imports beside the first stages, not before the first jobs (no-op if running)
        fp = self.fingerprints()
        self.out.mkdir(parents=True, exist_ok=True)
        if self.s.scratch:
            self.stage(1, "corpus", fp["corpus"], [self.data / "sft.jsonl"], self.corpus)
            self.stage(2, "sft", fp["sft"], [self.sft_dir, self.data / "model.json"], self.sft)
        else:
            self.stage(2, "sft", fp["sft"], [self.data / "model.json"], self.model_info)
        self.stage(3, "prompts", fp["prompts"], [self.data / f"{n}_prompts.jsonl" for n in ("train", "eval")],
                   self.prompts)
        self.stage(4, "sample", fp["sample"], [self.data / "groups.jsonl", self.data / "groups.jsonl.meta.json"],
                   self.sample)
        self.stage(5, "score", fp["score"], [self.data / "scored.jsonl", self.data / "scored.jsonl.meta.json"],
                   self.score)
        if any(m.endswith("-pref") for m in self.s.methods):  # pairs only for the methods that train on them
            self.stage(6, "label", fp["label"], [self.data / "pairs.jsonl"], self.label)
        runs = self.run_list()
        train_fp = {name: self.train_fp(fp["train"], m, b) for name, m, b in runs}
        eval_fp = {"sft": self.job_fp(fp["eval"], "sft")}
        eval_fp.update({name: self.job_fp(fp["eval"], train_fp[name]) for name, _, _ in runs})
        # Resumable at the run level: a run whose evaluation is done is not trained again (its checkpoints were
        # deleted once evaluated); one whose checkpoints are gone is trained again.
        evaluated = {name for name, efp in eval_fp.items()
                     if self.is_done(f"eval {name}", efp, [self.evals / f"{name}.json"])}
        for name, m, _ in runs:
            if name in evaluated:
                self._cached(f"[7/{N_STAGES}] train: train {name}", f"train {name}")
            elif not self.trained(name, m):
                self._mark(f"train {name}").unlink(missing_ok=True)
        steps = {name: len(self.eval_steps(m)) for name, m, _ in runs}
        # An offline run still to train is trained and evaluated by one job (its last step's weights passed in
        # memory); a run trained earlier (its checkpoints on disk) and an online run get an evaluation job of their own.
        together = {name for name, m, _ in runs if m not in ONLINE_METHODS and name not in evaluated
                    and not self.is_done(f"train {name}", train_fp[name], [self.runs / name])}
        args = lambda *rest: (str(self.out), self.s, self.device, *rest, str(self.work))  # noqa: E731
        trained_at = lambda name: _last_step(self.runs / name / "metrics.jsonl")  # noqa: E731
        evaluated_n = lambda name: _n_results(self.evals / f"{name}.json")  # noqa: E731
        # One pool for both stages: a run's evaluation starts as soon as its training is done (and π_sft's at
        # once), on whichever core is free, instead of after the last training.
        self.parallel("7-8", "train + eval", [
            (f"train {name}", train_fp[name], _train_eval_job, args(m, b),
             [self.runs / name], lambda name=name: trained_at(name) + evaluated_n(name), self.steps(m) + steps[name],
             (), [(f"eval {name}", eval_fp[name], [self.evals / f"{name}.json"])])
            if name in together else
            (f"train {name}", train_fp[name], _train_job, args(m, b),
             [self.runs / name], lambda name=name: trained_at(name), self.steps(m), ())
            for name, m, b in runs if name not in evaluated
        ] + [
            (f"eval {name}", efp, _eval_job, args(name),
             [self.evals / f"{name}.json"], lambda name=name: evaluated_n(name),
             1 if name == "sft" else steps[name], () if name == "sft" else (f"train {name}",))
            for name, efp in eval_fp.items() if name not in together
        ])
        from .report import write_report

        print(f"[{N_STAGES}/{N_STAGES}] report ...", file=sys.stderr)
        return write_report(self, runs)

    def parallel(self, n: int | str, what: str, jobs: list[tuple]) -> None:
        """Run the jobs ``(name, fingerprint, fn, args, outputs, progress, total, after[, also])`` that are not done
        yet side by side (one core each), each after the jobs named in its ``after``, with one bar. ``also``: the
        ``(name, fingerprint, outputs)`` of further jobs the job does (its function returns each one's seconds in
        ``parts``): marked done with it."""
        header = f"[{n}/{N_STAGES}] {what}"
        todo = []
        for name, fp, fn, args, outputs, progress, total, after, *rest in jobs:
            also = rest[0] if rest else []
            if self.is_done(name, fp, outputs):
                self._cached(f"{header}: {name}", name)
                continue
            self._clear(outputs + [out for _, _, outs in also for out in outs])
            todo.append(Job(name, fn, args, self.work / "logs" / f"{name.replace(' ', '-')}.log", progress, total,
                            on_done=lambda sec, cpu, extra, name=name, fp=fp, also=also:
                            self._done_parts(name, fp, also, sec, cpu, extra),
                            after=tuple(after)))
        if not todo:
            return
        workers = 1 if self.device == "cuda" else min(len(todo), self.s.workers or usable_cores())
        t0 = time.perf_counter()
        run_jobs(todo, f"{header} ({len(todo)} jobs, {workers} at a time)", workers)
        took = time.perf_counter() - t0
        self.stage_walls[what] = took
        print(f"{header}: done in {took:.1f} s (logs in {self.work / 'logs'})", file=sys.stderr)


def prune(run: Path) -> None:
    """Drop what the evaluation does not read once a run has finished: any training state left in a checkpoint
    (the trainer already drops it: train.save_final_state is off) and ``final/`` (the same weights as the last
    checkpoint). The weights of each checkpoint (0.54 GB on SmolLM2 in fp32) stay."""
    for state in run.glob("checkpoint-*/state"):
        shutil.rmtree(state)
    if (run / "final").is_dir() and any(run.glob("checkpoint-*")):
        shutil.rmtree(run / "final")


def _train_job(out: str, settings: DemoSettings, device: str, method: str, beta_pi: float, work: str) -> None:
    Demo(Path(out), settings, device, Path(work)).train(method, beta_pi)


def _eval_job(out: str, settings: DemoSettings, device: str, name: str, work: str) -> None:
    demo = Demo(Path(out), settings, device, Path(work))
    demo.evaluate(name)
    demo.drop_checkpoints(name)


def _train_eval_job(out: str, settings: DemoSettings, device: str, method: str, beta_pi: float,
                    work: str) -> dict[str, Any]:
    """An offline run's training and then its evaluation, in one process: the last step's weights go from the
    trainer to the evaluation in memory (not written, not read back; written too with keep_checkpoints).
    Returns each part's wall and CPU seconds (``parts``), which the parent records as the two jobs' timings."""
    demo = Demo(Path(out), settings, device, Path(work))
    name = run_name(method, beta_pi)
    t0, c0 = time.perf_counter(), time.process_time()
    model = demo.train(method, beta_pi, in_memory=True)
    t1, c1 = time.perf_counter(), time.process_time()
    demo.evaluate(name, last=model, method=method)
    del model
    demo.drop_checkpoints(name)
    t2, c2 = time.perf_counter(), time.process_time()
    return {"parts": {f"train {name}": (t1 - t0, c1 - c0), f"eval {name}": (t2 - t1, c2 - c1)}}


def _last_step(metrics: Path) -> int:
    """The last optimizer step logged in a run's metrics.jsonl (0 before the first)."""
    try:
        lines = metrics.read_text(encoding="utf-8").strip().splitlines()
        return int(json.loads(lines[-1])["step"]) if lines else 0
    except (OSError, ValueError, KeyError):
        return 0


def _n_results(eval_json: Path) -> int:
    try:
        return len(json.loads(eval_json.read_text(encoding="utf-8"))["results"])
    except (OSError, ValueError, KeyError):
        return 0


# ---------------------------------------------------------------------------------------------- CLI
def settings_for(quick: bool, seed: int, overrides: list[str] | tuple[str, ...] = (), model: str | None = None,
                 device: str = "cpu", full: bool = False) -> DemoSettings:
    """The preset for the model, size and device, with ``seed`` and ``key=value`` overrides, type-checked like
    any exoalign config (an unknown key gets a "did you mean"). The model is ``model``, else a ``model=…``
    override, else the default (smollm2)."""
    from ..config import load_config, parse_override

    chosen = model
    for item in overrides:
        key, value = parse_override(item)
        if key == "model":
            chosen = str(value)
    chosen = chosen or DemoSettings.model
    pre = [f"{k}={json.dumps(v)}" for k, v in preset(chosen, quick, device, full).items()]  # JSON is YAML: "no" stays a string
    return load_config(DemoSettings, None, [*pre, f"model={chosen}", f"seed={seed}", *overrides])


def resolve_device(device: str | None) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda but no CUDA GPU is available", field="--device", fix="use --device cpu")
    return device


def _parser() -> Any:
    from ..config import ConfigArgumentParser, describe

    rows = [r for r in describe(DemoSettings) if r[0] != "seed"]
    width = max(len(k) for k, _, _ in rows)
    p = ConfigArgumentParser(
        prog="exoalign demo", description=__doc__.split("\n\n")[0],
        epilog="Outputs: DIR/report.md, DIR/results.json, DIR/frontier.png (and every stage's files).\n\n"
               "settings (key=value, --key value or --set key=value; presets by model and --quick):\n"
               + "\n".join(f"  {k:<{width}}  {h} (default {d})" for k, d, h in rows),
        formatter_class=__import__("argparse").RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="a small run of the same chain (a few minutes)")
    p.add_argument("--full", action="store_true",
                   help="the powered experiment: six methods, several seeds, a pooled verdict (hours; docs/demo.md)")
    p.add_argument("--seeds", default=",".join(map(str, FULL_SEEDS)),
                   help="--full: comma-separated seeds (default 0,1,2)")
    p.add_argument("--results", default="benchmarks/results/demo",
                   help="--full: where full-seed{N}/ and full-pooled/ go (default benchmarks/results/demo)")
    p.add_argument("--model", default=None, help="π_sft: smollm2 (default), a model directory, or scratch (the toy)")
    p.add_argument("--out", default="exoalign-demo",
                   help="directory for everything (default ./exoalign-demo); --full: its checkpoints, caches and logs")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="seed of the whole chain (default 0)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="same as a bare key=value")
    p.add_argument("overrides", nargs="*", help="key=value settings (see below)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.device not in (None, "cpu", "cuda"):
        raise InputError(f"unknown device {args.device!r}", field="--device", fix="use --device cpu or --device cuda")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.device != "cuda" and usable_cores() > 1:
        start_worker_server()  # the workers' imports on the idle core while this process loads its own
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the models' config chatter is not news to a demo user
    if args.full and args.quick:
        raise InputError("--full and --quick together", field="--full", fix="choose one of them")
    if args.full:
        return _main_full(args)
    device = resolve_device(args.device)
    settings = settings_for(args.quick, args.seed, [*args.set, *args.overrides], model=args.model, device=device)
    one_thread()  # see jobs: small models run fastest on one thread per process, one process per core
    demo = Demo(Path(args.out), settings, device)
    t0 = time.perf_counter()
    results = demo.run()
    print(f"\n{results['verdict']}\n", file=sys.stderr)
    print(f"done in {time.perf_counter() - t0:.1f} s: {demo.out / 'report.md'}, {demo.out / 'results.json'}, "
          f"{demo.out / 'frontier.png'}")
    return 0


def _main_full(args: Any) -> int:
    """``exoalign demo --full``: every seed of ``--seeds``, then the pooled report."""
    from .full import run_full

    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--seeds {args.seeds!r} is not a list of whole numbers", field="--seeds",
                         fix="e.g. --seeds 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise InputError(f"--seeds {args.seeds!r} needs distinct seeds", field="--seeds", fix="e.g. --seeds 0,1,2")
    device = resolve_device(args.device)
    overrides = [*args.set, *args.overrides]
    # Every seed's settings are checked before anything runs.
    settings = {seed: settings_for(False, seed, overrides, model=args.model, device=device, full=True) for seed in seeds}
    one_thread()
    t0 = time.perf_counter()
    results = Path(args.results)
    pooled = run_full(results, Path(args.out), seeds,
                      lambda out, work, seed: Demo(out, settings[seed], device, work).run())
    print(f"\n{pooled['verdict']}\n", file=sys.stderr)
    print(f"done in {time.perf_counter() - t0:.1f} s: {results / 'full-pooled' / 'report.md'}")
    return 0
