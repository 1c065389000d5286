"""``exoalign demo``: EXO vs DPO on controlled sentiment generation, offline, on a CPU, in minutes.

    exoalign demo [--quick] [--out DIR] [--device cpu|cuda] [--seed N] [--set KEY=VALUE ...]

The paper's IMDB experiment (Ji et al., ICML 2024, §5.1) scaled down to a CPU and run by the library's own
stages, each reading and writing files in ``DIR`` (default ``./exoalign-demo``); see ``docs/demo.md``:

1. ``corpus``  synthetic movie reviews from a stochastic grammar (:mod:`exoalign.demo.reviews`) → SFT rows;
2. ``sft``     π_sft: a byte-level BPE tokeniser and a small GPT-2 trained from scratch (``exoalign sft``);
3. ``prompts`` training and held-out prompts: the first 3–6 words of other reviews, each distinct;
4. ``sample``  K completions per training prompt from π_sft (``exoalign sample``);
5. ``score``   rewards from the oracle, VADER sentiment of the completion (``exoalign score``);
6. ``label``   best-vs-worst preference pairs from the scored groups (``exoalign label``);
7. ``train``   four runs on the same prompts with the same budget: ``exo`` and ``dpo``, each with ``pref``
   targets (the pairs) and ``rw`` targets (the K scored completions) (``exoalign train``);
8. ``eval``    π_sft and every checkpoint on the held-out prompts: oracle reward and ``KL(π‖π_sft)``
   (``exoalign eval``);
9. ``report``  the reward–KL frontier (``exoalign plot frontier``), ``results.json`` and ``report.md``.

A stage is skipped when its outputs exist and were made with the same settings (a fingerprint of the settings
it depends on, chained through the stages before it), so a second run, or a run after an interruption, only
does what is missing. Change a setting and exactly the stages that depend on it run again. (The device is not part of the
fingerprint: results made on the CPU are reused by a ``--device cuda`` run in the same directory.)
"""

from __future__ import annotations

import argparse
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
from . import reviews
from .jobs import Job, one_thread, run_jobs, usable_cores
from .settings import METHODS, QUICK, STAGE_KEYS, DemoSettings, method_name  # noqa: F401 (re-exported)


# ------------------------------------------------------------------------------------------ stages
class Demo:
    """The demo's directory, settings and stages; :meth:`run` does what is not done yet."""

    def __init__(self, out: Path, settings: DemoSettings, device: str) -> None:
        self.out, self.s, self.device = out, settings, device
        self.data = out / "data"
        self.sft_dir = out / "sft"
        self.runs = out / "runs"
        self.evals = out / "eval"
        self.marks = out / ".stages"
        self.timings: dict[str, dict[str, Any]] = {}
        self.started = time.perf_counter()

    # -- bookkeeping
    def fingerprints(self) -> dict[str, str]:
        """Chained fingerprints: a change of a setting changes the fingerprint of its stage and all later ones."""
        prev, out = "exoalign-demo/1", {}
        values = dataclasses.asdict(self.s)
        for stage, keys in STAGE_KEYS.items():
            blob = json.dumps([prev, stage, {k: values[k] for k in keys}], sort_keys=True)
            prev = out[stage] = hashlib.sha256(blob.encode()).hexdigest()[:16]
        return out

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

    def _done(self, name: str, fp: str, seconds: float, cpu: float) -> None:
        """Mark stage ``name`` done; its wall and CPU seconds go into the marker and the timings."""
        self.marks.mkdir(parents=True, exist_ok=True)
        tmp = self._mark(name).with_suffix(".tmp")
        record = {"fingerprint": fp, "seconds": seconds, "cpu_seconds": cpu, "device": self.device}
        tmp.write_text(json.dumps(record), encoding="utf-8")
        os.replace(tmp, self._mark(name))
        self.timings[name] = {"seconds": seconds, "cpu_seconds": cpu, "cached": False}

    def _cached(self, header: str, name: str) -> None:
        mark = json.loads(self._mark(name).read_text(encoding="utf-8"))
        print(f"{header}: cached ({mark['seconds']:.1f} s when it ran)", file=sys.stderr)
        self.timings[name] = {"seconds": mark["seconds"], "cpu_seconds": mark.get("cpu_seconds"), "cached": True}

    def stage(self, n: int, name: str, fp: str, outputs: list[Path], work: Callable[[], None]) -> None:
        """Run ``work`` unless stage ``name`` is done with fingerprint ``fp``; time it; mark it done."""
        header = f"[{n}/{len(STAGE_KEYS) + 1}] {name}"
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
        prompts = prompts[:n_prompts]
        write_rows(self.data / "train_prompts.jsonl", [{"prompt": p} for p in prompts[: s.n_train_prompts]])
        write_rows(self.data / "eval_prompts.jsonl", [{"prompt": p} for p in prompts[s.n_train_prompts:]])

    def _train_args(self, **kw: Any) -> Any:
        from ..train.config import TrainArgs

        return TrainArgs(seed=self.s.seed, cpu=self.device == "cpu", log_every=1,
                         ref_cache_dir=str(self.out / "cache"), **kw)

    def sft(self) -> None:
        from ..stages.sft import SFTConfig, sft
        from ..train.config import DataBaseConfig, ModelConfig

        s = self.s
        cfg = SFTConfig(
            model=ModelConfig(init="scratch", model_type="gpt2", vocab_size=s.vocab_size,
                              scratch_config={"n_layer": s.n_layer, "n_embd": s.n_embd, "n_head": s.n_head}),
            data=DataBaseConfig(train_file=str(self.data / "sft.jsonl"), max_length=s.max_length,
                                max_prompt_length=24),
            train=self._train_args(output_dir=str(self.sft_dir), lr=s.sft_lr, batch_size=s.sft_batch_size,
                                   max_steps=s.sft_steps, warmup_steps=max(1, s.sft_steps // 20),
                                   scheduler="cosine"),
        )
        sft(cfg)

    def sample(self) -> None:
        from ..stages.sample import SampleConfig, run

        s = self.s
        run(SampleConfig(model=str(self.sft_dir / "final"), prompts=str(self.data / "train_prompts.jsonl"),
                         output=str(self.data / "groups.jsonl"), k=s.k, temperature=s.temperature,
                         max_new_tokens=s.max_new_tokens, min_new_tokens=1, seed=s.seed,
                         batch_size=s.gen_batch_size, device=self.device))

    def score(self) -> None:
        from ..stages.score import ScoreConfig, run

        run(ScoreConfig(input=str(self.data / "groups.jsonl"), output=str(self.data / "scored.jsonl"),
                        oracle=reviews.ORACLE, device=self.device))

    def label(self) -> None:
        from ..stages.label import LabelConfig, run

        run(LabelConfig(input=str(self.data / "scored.jsonl"), output=str(self.data / "pairs.jsonl"),
                        method="best_worst"))

    def train(self, loss: str, target: str) -> None:
        from ..train.config import DataConfig, LossConfig, ModelConfig, TrainConfig
        from ..train.loop import train

        s = self.s
        data = self.data / ("pairs.jsonl" if target == "pref" else "scored.jsonl")
        cfg = TrainConfig(
            model=ModelConfig(name_or_path=str(self.sft_dir / "final")),
            data=DataConfig(train_file=str(data), max_length=s.max_length, max_prompt_length=24,
                            k=2 if target == "pref" else None),
            loss=LossConfig(name=loss, target=target, beta_pi=s.beta_pi, beta_r=s.beta_r, eps=s.eps),
            train=self._train_args(output_dir=str(self.runs / method_name(loss, target)), lr=s.align_lr,
                                   batch_size=s.align_batch_size, max_steps=s.align_steps,
                                   warmup_steps=min(10, s.align_steps // 4), scheduler="constant_with_warmup",
                                   save_every=s.save_every),
        )
        train(cfg)

    def checkpoints(self, name: str) -> list[Path]:
        """Every saved checkpoint of run ``name`` in step order; ``sft`` is π_sft alone (step 0 of every run)."""
        if name == "sft":
            return [self.sft_dir / "final"]
        run = self.runs / name
        steps = sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*") if (p / "COMPLETE").is_file())
        return [run / f"checkpoint-{k}" for k in steps]

    def evaluate(self, name: str) -> None:
        """``exoalign eval`` of run ``name``'s checkpoints. π_sft is evaluated once, as run ``sft``, and the
        report puts it at step 0 of every run; every evaluation draws its samples from the same seeds."""
        from ..eval.evaluate import EvalConfig, run

        s = self.s
        run(EvalConfig(checkpoints=[str(p) for p in self.checkpoints(name)], sft_model=str(self.sft_dir / "final"),
                       prompts=str(self.data / "eval_prompts.jsonl"), oracle=reviews.ORACLE,
                       samples_per_prompt=s.eval_samples, temperature=s.temperature, max_new_tokens=s.max_new_tokens,
                       min_new_tokens=1, seed=s.seed + 1000, batch_size=s.gen_batch_size, win_rate=False,
                       output=str(self.evals / f"{name}.json"), run_name=name, device=self.device,
                       logp_batch_size=64))

    # -- the whole chain
    def run(self) -> dict[str, Any]:
        self.started = time.perf_counter()
        fp = self.fingerprints()
        self.out.mkdir(parents=True, exist_ok=True)
        self.stage(1, "corpus", fp["corpus"], [self.data / "sft.jsonl"], self.corpus)
        self.stage(2, "sft", fp["sft"], [self.sft_dir], self.sft)
        self.stage(3, "prompts", fp["prompts"], [self.data / f"{n}_prompts.jsonl" for n in ("train", "eval")],
                   self.prompts)
        self.stage(4, "sample", fp["sample"], [self.data / "groups.jsonl", self.data / "groups.jsonl.meta.json"],
                   self.sample)
        self.stage(5, "score", fp["score"], [self.data / "scored.jsonl", self.data / "scored.jsonl.meta.json"],
                   self.score)
        self.stage(6, "label", fp["label"], [self.data / "pairs.jsonl"], self.label)
        names = [method_name(*m) for m in METHODS]
        self.parallel(7, "train", fp["train"], [
            (f"train {n}", _train_job, (str(self.out), self.s, self.device, *m), [self.runs / n],
             lambda n=n: _last_step(self.runs / n / "metrics.jsonl"), self.s.align_steps)
            for n, m in zip(names, METHODS)
        ])
        n_ckpt = {n: len(self.checkpoints(n)) for n in names}
        self.parallel(8, "eval", fp["eval"], [
            (f"eval {n}", _eval_job, (str(self.out), self.s, self.device, n), [self.evals / f"{n}.json"],
             lambda n=n: _n_results(self.evals / f"{n}.json"), 1 if n == "sft" else n_ckpt[n])
            for n in ["sft", *names]
        ])
        from .report import write_report

        print(f"[{len(STAGE_KEYS) + 1}/{len(STAGE_KEYS) + 1}] report ...", file=sys.stderr)
        return write_report(self, names)

    def parallel(self, n: int, what: str, fp: str, jobs: list[tuple]) -> None:
        """Run the jobs of stage ``what`` that are not done yet side by side (one core each), with one bar."""
        header = f"[{n}/{len(STAGE_KEYS) + 1}] {what}"
        todo = []
        for name, fn, args, outputs, progress, total in jobs:
            if self.is_done(name, fp, outputs):
                self._cached(f"{header}: {name}", name)
                continue
            self._clear(outputs)
            todo.append(Job(name, fn, args, self.out / "logs" / f"{name.replace(' ', '-')}.log", progress, total,
                            on_done=lambda sec, cpu, name=name: self._done(name, fp, sec, cpu)))
        if not todo:
            return
        workers = 1 if self.device == "cuda" else min(len(todo), usable_cores())
        t0 = time.perf_counter()
        run_jobs(todo, f"{header} ({len(todo)} jobs, {workers} at a time)", workers)
        print(f"{header}: done in {time.perf_counter() - t0:.1f} s (logs in {self.out / 'logs'})", file=sys.stderr)


def _train_job(out: str, settings: DemoSettings, device: str, loss: str, target: str) -> None:
    Demo(Path(out), settings, device).train(loss, target)


def _eval_job(out: str, settings: DemoSettings, device: str, name: str) -> None:
    Demo(Path(out), settings, device).evaluate(name)


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
def settings_for(quick: bool, seed: int, overrides: list[str] | tuple[str, ...] = ()) -> DemoSettings:
    """The preset (default or ``--quick``) with ``seed`` and ``key=value`` overrides (``--set``), type-checked
    like any exoalign config (an unknown key gets a "did you mean")."""
    from ..config import load_config

    preset = [f"{k}={v}" for k, v in (QUICK if quick else {}).items()]
    return load_config(DemoSettings, None, [*preset, f"seed={seed}", *overrides])


def resolve_device(device: str | None) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda but no CUDA GPU is available", field="--device", fix="use --device cpu")
    return device


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="exoalign demo", description=__doc__.split("\n\n")[0],
        epilog="Outputs: DIR/report.md, DIR/results.json, DIR/frontier.png (and every stage's files).",
    )
    parser.add_argument("--quick", action="store_true", help="a small run of the same chain (under 2 minutes)")
    parser.add_argument("--out", default="exoalign-demo", help="directory for everything (default ./exoalign-demo)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument("--seed", type=int, default=0, help="seed of the whole chain (default 0)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change one setting (repeatable), e.g. --set beta_r=1.0; keys: "
                             + ", ".join(f.name for f in dataclasses.fields(DemoSettings) if f.name != "seed"))
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the tiny model's config chatter is not news to a demo user
    device = resolve_device(args.device)
    one_thread()  # see demo_jobs: tiny models run fastest on one thread per process, one process per core
    demo = Demo(Path(args.out), settings_for(args.quick, args.seed, args.set), device)
    t0 = time.perf_counter()
    results = demo.run()
    print(f"\n{results['verdict']}\n", file=sys.stderr)
    print(f"done in {time.perf_counter() - t0:.1f} s: {demo.out / 'report.md'}, {demo.out / 'results.json'}, "
          f"{demo.out / 'frontier.png'}")
    return 0
