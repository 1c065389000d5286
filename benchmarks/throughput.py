"""Throughput and memory of exoalign's training step against TRL's DPOTrainer on the same EXO job.

One run, systems interleaved step by step (A B C A B C …), each in its own process so that its peak resident
memory is its own. Every system trains the same GPT-2-style model (built from a config with a fixed seed and
saved once), on the same pairs (same token ids, same order), with the same optimiser settings, in fp32 on the
same number of threads:

* ``exoalign``          — ``exoalign.train.loop.train``: the library's own loop (reference log-probs cached
  before training, prompt sharing on);
* ``exoalign_unshared`` — the same with prompt sharing off (full runs only);
* ``trl_default``       — ``trl.DPOTrainer`` with its defaults and ``loss_type="exo_pair"``, ``label_smoothing=1e-3``;
* ``trl_fastest``       — the same with ``precompute_ref_log_probs=True`` (its fastest option that applies here).

The reference model is a second model of the same shape built with seed + 1, so that the step-0 loss is not
the trivial ``KL([½, ½] ‖ [1 − ε, ε])`` of a policy equal to its reference and its agreement across systems
checks the log-prob code.

The limit: dense fp32 matmul throughput measured in the same run; model FLOP utilisation is
``(6 × params × policy tokens + 2 × params × reference tokens if not cached) / step time / peak``, with the
tokens a system actually feeds (prompt sharing feeds fewer). Prompt sharing is also timed alone on
summarisation-like groups (prompt 384 tokens, completions 48, K = 2, 4, 8): a forward + backward of the
loss with and without it.

    .venv/bin/python benchmarks/throughput.py                       # full run (~15 min on 2 idle cores)
    .venv/bin/python benchmarks/throughput.py --quick --json out.json   # < 3 min

``--json`` writes exactly ``speedup_vs_trl_default``, ``speedup_vs_trl_fastest``, ``memory_ratio_vs_trl``,
``mfu``, ``loss_match``, ``prefix_sharing`` and ``versions``; ``--md`` writes the Markdown tables.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

# ------------------------------------------------------------------------------------------ shapes
LOSS_TOL = 1e-4  # step-0 losses of all systems must agree this closely


@dataclass
class Shape:
    """Everything that defines the job; the presets below are the full run, --quick and --tiny (tests)."""

    layers: int = 6
    width: int = 384
    heads: int = 6
    vocab: int = 8192
    positions: int = 1024
    prompt_len: int = 64
    completion_len: int = 64  # EOS included
    pairs: int = 8  # pairs per step (batch size)
    warmup: int = 2  # steps per system excluded from the timings
    steps: int = 10  # timed steps per system
    threads: int = 2
    seed: int = 0
    prefix_prompt: int = 384
    prefix_completion: int = 48
    prefix_ks: tuple[int, ...] = (2, 4, 8)
    prefix_groups: int = 2  # groups per batch in the prompt-sharing benchmark
    prefix_steps: int = 3  # timed steps per (K, layout)
    prefix_warmup: int = 1  # untimed steps per (K, layout) before them
    systems: tuple[str, ...] = ("exoalign", "exoalign_unshared", "trl_default", "trl_fastest")

    @property
    def rows(self) -> int:
        return (self.warmup + self.steps + 1) * self.pairs  # +1: the exoalign hook stops at the next step


QUICK = dict(warmup=1, steps=2, prefix_groups=1, prefix_steps=1, prefix_warmup=0,
             systems=("exoalign", "trl_default", "trl_fastest"))
TINY = dict(layers=2, width=64, heads=2, vocab=512, positions=128, prompt_len=8, completion_len=8, pairs=2,
            warmup=1, steps=1, prefix_prompt=16, prefix_completion=4, prefix_ks=(2, 4), prefix_groups=1,
            prefix_steps=1, systems=("exoalign", "trl_default", "trl_fastest"))


# ------------------------------------------------------------------------------------------ assets
def words(ids: list[int]) -> str:
    return " ".join(f"w{i}" for i in ids)


def make_assets(shape: Shape, root: Path) -> None:
    """Tokeniser, policy (seed), reference (seed + 1) and the pairs, written once for every worker to load.

    The tokeniser maps the word ``w{i}`` to id ``i`` (ids 0 and 1 are EOS and PAD), so texts of 64 words are
    exactly 64 tokens for both systems and the two tokenisation pipelines give the same ids.
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from exoalign.models import build_model, tiny_config

    vocab = {"<eos>": 0, "<pad>": 1, **{f"w{i}": i for i in range(2, shape.vocab)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<pad>",
                                  model_max_length=shape.positions)
    config = tiny_config(shape.vocab, n_layer=shape.layers, n_embd=shape.width, n_head=shape.heads,
                         n_positions=shape.positions, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    for name, seed in (("policy", shape.seed), ("reference", shape.seed + 1)):
        model = build_model(config, seed=seed, tokenizer=tok)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    g = torch.Generator().manual_seed(shape.seed)
    rows = []
    for _ in range(shape.rows):
        ids = torch.randint(2, shape.vocab, (shape.prompt_len + 2 * (shape.completion_len - 1),), generator=g).tolist()
        p, c = shape.prompt_len, shape.completion_len - 1  # EOS is appended by both pipelines
        # Completions start with a space: TRL tokenises prompt + completion as one text.
        rows.append({"prompt": words(ids[:p]), "chosen": " " + words(ids[p : p + c]),
                     "rejected": " " + words(ids[p + c :])})
    with open(root / "pairs.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


# ------------------------------------------------------------------------------------------ workers
class Channel:
    """The worker's side of the step protocol: stdin gets ``step``/``done``, a private fd gets JSON lines.

    Libraries print to stdout (progress bars, warnings), so the protocol keeps the original stdout to itself
    and points fd 1 at stderr.
    """

    def __init__(self) -> None:
        self.out: TextIO = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        self.t_go = self.cpu_go = 0.0
        self.baseline_mb = 0.0

    def send(self, **msg: Any) -> None:
        self.out.write(json.dumps(msg) + "\n")
        self.out.flush()

    def wait(self) -> bool:
        """Block until the parent says ``step`` (True) or ``done`` (False); start the step clock."""
        line = sys.stdin.readline().strip()
        self.t_go, self.cpu_go = time.perf_counter(), time.process_time()
        return line == "step"

    def step_done(self, loss: float) -> None:
        # CPU seconds beside wall seconds: on a shared machine they show how much of the wall time was waiting.
        self.send(step_s=time.perf_counter() - self.t_go, cpu_s=time.process_time() - self.cpu_go, loss=loss)

    def finish(self, **extra: Any) -> None:
        self.send(peak_rss_mb=peak_rss_mb(), baseline_rss_mb=self.baseline_mb, **extra)


class _Stop(Exception):
    """Raised inside the exoalign loop to end it after the last timed step."""


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def current_rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _setup(shape: Shape, work: Path) -> None:
    import torch

    torch.set_num_threads(shape.threads)
    torch.set_num_interop_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["HF_DATASETS_CACHE"] = str(work / "hf-datasets")
    os.environ["EXOALIGN_CACHE"] = str(work / "exoalign-cache")


def compute_loss_fn(prefix_sharing: bool):
    """The trainer's per-batch computation (``exoalign.train.step.compute_loss``) with prompt sharing on or off."""
    from exoalign.train.step import compute_loss

    return functools.partial(compute_loss, prefix_sharing=prefix_sharing)


def run_exoalign(shape: Shape, assets: Path, work: Path, ch: Channel, prefix_sharing: bool) -> None:
    """``exoalign.train.loop.train`` on the pairs; a hook around its ``compute_loss`` paces the steps."""
    from exoalign.train import loop
    from exoalign.train.config import DataConfig, LossConfig, ModelConfig, TrainArgs, TrainConfig

    cfg = TrainConfig(
        model=ModelConfig(name_or_path=str(assets / "policy"), ref_name_or_path=str(assets / "reference")),
        data=DataConfig(train_file=str(assets / "pairs.jsonl"), max_length=shape.prompt_len + shape.completion_len,
                        max_prompt_length=shape.prompt_len),
        loss=LossConfig(name="exo", target="pref", beta_pi=0.1, eps=1e-3),
        train=TrainArgs(output_dir=str(work / "run"), lr=1e-6, batch_size=shape.pairs,
                        max_steps=shape.warmup + shape.steps + 1, seed=shape.seed, cpu=True,
                        ref_cache_dir=str(work / "ref-cache"), prefix_sharing=prefix_sharing),
    )
    inner = loop.compute_loss  # the loop passes train.prefix_sharing to it
    calls = [0]
    tokens = [0]

    def paced(model, batch, loss_cfg, ref_model=None, **kw):
        # Call i reports step i − 1 (its clock ran from the parent's "step" until now: backward, clipping,
        # optimiser, logging and the next batch's collation included), then waits for the next command.
        if calls[0] == 0:
            ch.send(ready=True)
        else:
            ch.step_done(last_loss[0])
        if not ch.wait():
            raise _Stop
        calls[0] += 1
        if calls[0] == 1:  # every batch of this job has the same shape
            tokens[0] = policy_tokens(batch, prefix_sharing)
        loss, metrics = inner(model, batch, loss_cfg, ref_model, **kw)
        last_loss[0] = float(loss.detach())
        return loss, metrics

    last_loss = [float("nan")]
    loop.compute_loss = paced
    ch.baseline_mb = current_rss_mb()
    try:
        loop.train(cfg)
    except _Stop:
        pass
    ch.finish(policy_tokens=tokens[0], ref_tokens=0)


def policy_tokens(batch: dict, prefix_sharing: bool) -> int:
    """Non-padding tokens the policy's forward pass sees for a collated group batch."""
    am = batch["attention_mask"]
    if not prefix_sharing:
        return int(am.sum())
    from exoalign.packing import pack_shared_prefix

    packed = pack_shared_prefix(batch["input_ids"], am, batch["labels"], batch["group_mask"])
    return int((packed.segments >= 0).sum()) if packed is not None else int(am.sum())


def run_trl(shape: Shape, assets: Path, work: Path, ch: Channel, fastest: bool) -> None:
    """``trl.DPOTrainer`` (exo_pair) on the same pairs in exoalign's data order; a callback paces the steps."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from exoalign.train.engine import EpochSampler

    rows = [json.loads(line) for line in open(assets / "pairs.jsonl", encoding="utf-8")]
    order = list(EpochSampler(len(rows), shape.seed))  # exoalign's epoch-0 order, so step i sees the same pairs

    class FixedOrder(torch.utils.data.Sampler):
        def __iter__(self):
            return iter(order)

        def __len__(self) -> int:
            return len(order)

    class Trainer(DPOTrainer):
        bench_loss = float("nan")

        def _get_train_sampler(self, *args, **kwargs):
            return FixedOrder()

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.bench_loss = float((out[0] if return_outputs else out).detach())
            return out

    class Pace(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ch.step_done(trainer.bench_loss)
            if not ch.wait():
                control.should_training_stop = True
            return control

    ch.baseline_mb = current_rss_mb()
    tok = AutoTokenizer.from_pretrained(assets / "policy")
    model = AutoModelForCausalLM.from_pretrained(assets / "policy", dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(assets / "reference", dtype=torch.float32)
    config = DPOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=shape.pairs, max_steps=shape.warmup + shape.steps + 1,
        loss_type=["exo_pair"], label_smoothing=1e-3, beta=0.1, learning_rate=1e-6, bf16=False, use_cpu=True,
        report_to="none", save_strategy="no", seed=shape.seed, disable_tqdm=True,
        precompute_ref_log_probs=fastest,
    )
    trainer = Trainer(model=model, ref_model=ref, args=config, train_dataset=Dataset.from_list(rows),
                      processing_class=tok, callbacks=[Pace()])
    ch.send(ready=True)
    if ch.wait():
        trainer.train()
    n = shape.pairs * 2 * (shape.prompt_len + shape.completion_len)
    ch.finish(policy_tokens=n, ref_tokens=0 if fastest else n)


def matmul_peak() -> float:
    """Dense fp32 matmul GFLOP/s: the best of a few square sizes, a few repetitions each."""
    import torch

    best = 0.0
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        for _ in range(2):
            a @ b
        reps = max(2, int(4e9 / (2 * n**3)))
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t) / 1e9)
    return best


def run_prefix(shape: Shape, assets: Path) -> dict:
    """The matmul peak, then forward + backward of the EXO loss on K-completion groups with and without
    prompt sharing, then the peak again (the best of the two is the limit)."""
    import torch

    from exoalign.data import GroupCollator
    from exoalign.models import load_causal_lm
    from exoalign.packing import supports_shared_prefix
    from exoalign.train.config import LossConfig

    peaks = [matmul_peak()]
    model = load_causal_lm(str(assets / "policy"))
    model.train()
    if not supports_shared_prefix(model):  # also runs the one-off probe before anything is timed
        raise RuntimeError("prompt sharing is unavailable for the benchmark model")
    loss_cfg = LossConfig(name="exo", target="rw", beta_pi=0.1, beta_r=0.1)
    fns = {share: compute_loss_fn(share) for share in (False, True)}
    g = torch.Generator().manual_seed(shape.seed + 2)
    result: dict[str, dict[str, float]] = {}
    for K in shape.prefix_ks:
        feats = []
        for b in range(shape.prefix_groups):
            ids = torch.randint(2, shape.vocab, (shape.prefix_prompt + K * shape.prefix_completion,), generator=g)
            prompt = ids[: shape.prefix_prompt].tolist()
            comps = [ids[shape.prefix_prompt + k * shape.prefix_completion :][: shape.prefix_completion].tolist()
                     for k in range(K)]
            comps = [c[:-1] + [0] for c in comps]  # EOS last, as the tokeniser pipeline does
            feats.append({"index": b, "prompt_ids": prompt, "completion_ids": comps,
                          "rewards": torch.randn(K, generator=g).tolist(), "ref_logps": [-300.0] * K})
        batch = GroupCollator(1)(feats)
        times: dict[bool, list[float]] = {False: [], True: []}
        losses: dict[bool, float] = {}
        for i in range(shape.prefix_warmup + shape.prefix_steps):
            for share in (False, True):  # interleaved
                t = time.perf_counter()
                loss, _ = fns[share](model, batch, loss_cfg)
                loss.backward()
                model.zero_grad(set_to_none=True)
                if i >= shape.prefix_warmup:
                    times[share].append(time.perf_counter() - t)
                losses[share] = float(loss.detach())
        unshared, shared = statistics.median(times[False]), statistics.median(times[True])
        result[str(K)] = {"unshared_s": unshared, "shared_s": shared, "speedup": unshared / shared,
                          "loss_diff": abs(losses[True] - losses[False])}
    peaks.append(matmul_peak())
    return {"prefix": result, "peaks": peaks}


FAMILIES = {
    "matmul (linear layers, LM head)": ("aten::mm", "aten::addmm", "aten::bmm"),
    "attention (SDPA)": ("scaled_dot_product",),
    "elementwise mul/pow/tanh (mostly gelu_new)": ("aten::mul", "aten::pow", "aten::tanh"),
    "layer norm": ("layer_norm",),
    "copies, cat, fill (layouts, transposes)": ("aten::copy_", "aten::cat", "aten::fill_", "aten::zero_"),
    "adds and sums (residuals, bias grads)": ("aten::add", "aten::sum"),
}


def profile_step(shape: Shape, assets: Path, prefix_sharing: bool = True, steps: int = 3) -> dict[str, list]:
    """Where a training step like the loop's goes: wall seconds per phase (median of ``steps``), and the
    forward + backward's self time by operator family (torch.profiler, one step).

    The optimiser is ``torch.optim.AdamW`` with the loop's arguments (the default implementation), and the
    fused one for comparison.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    from exoalign.data import GroupCollator
    from exoalign.models import load_causal_lm
    from exoalign.train.config import LossConfig

    model = load_causal_lm(str(assets / "policy"))
    model.train()
    g = torch.Generator().manual_seed(shape.seed)
    c = shape.completion_len
    feats = [{"index": b, "prompt_ids": torch.randint(2, shape.vocab, (shape.prompt_len,), generator=g).tolist(),
              "completion_ids": [torch.randint(2, shape.vocab, (c - 1,), generator=g).tolist() + [0] for _ in range(2)],
              "ref_logps": [-600.0, -600.0]} for b in range(shape.pairs)]
    batch = GroupCollator(1)(feats)
    fn = compute_loss_fn(prefix_sharing)
    loss_cfg = LossConfig(name="exo", target="pref", beta_pi=0.1, eps=1e-3)
    opts = {"AdamW (default)": torch.optim.AdamW(model.parameters(), lr=1e-6),
            "AdamW (fused=True)": torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)}
    phases: dict[str, list[float]] = {}

    def timed(name: str, f):
        t = time.perf_counter()
        out = f()
        phases.setdefault(name, []).append(time.perf_counter() - t)
        return out

    def fwd_bwd() -> None:
        loss, _ = timed("forward (loss)", lambda: fn(model, batch, loss_cfg))
        timed("backward", loss.backward)
        timed("clip", lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))

    for i in range(steps + 1):
        for name, opt in opts.items():
            fwd_bwd()
            timed(name, opt.step)
            opt.zero_grad(set_to_none=True)
        if i == 0:
            phases.clear()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss, _ = fn(model, batch, loss_cfg)
        loss.backward()
    model.zero_grad(set_to_none=True)
    families: dict[str, float] = {}
    for e in prof.key_averages():
        fam = next((f for f, keys in FAMILIES.items() if any(e.key.startswith(k) or k in e.key for k in keys)), "other")
        families[fam] = families.get(fam, 0.0) + e.self_cpu_time_total / 1e6
    return {"phases": [(k, statistics.median(v)) for k, v in phases.items()],
            "families": sorted(families.items(), key=lambda kv: -kv[1])}


def worker_main(system: str, shape: Shape, assets: Path, work: Path) -> None:
    ch = Channel()
    _setup(shape, work)
    if system.startswith("exoalign"):
        run_exoalign(shape, assets, work, ch, prefix_sharing=system == "exoalign")
    elif system.startswith("trl"):
        run_trl(shape, assets, work, ch, fastest=system == "trl_fastest")
    else:
        raise SystemExit(f"unknown system {system}")


# ------------------------------------------------------------------------------------------ parent
class Worker:
    """A worker subprocess speaking the step protocol; its stderr goes to a log file."""

    def __init__(self, system: str, shape: Shape, assets: Path, work: Path) -> None:
        self.system = system
        wdir = work / system
        wdir.mkdir(parents=True, exist_ok=True)
        self.log_path = wdir / "stderr.log"
        env = {**os.environ, "OMP_NUM_THREADS": str(shape.threads), "MKL_NUM_THREADS": str(shape.threads),
               "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
        cmd = [sys.executable, __file__, "--worker", system, "--shape", json.dumps(asdict(shape)),
               "--assets", str(assets), "--work", str(wdir)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(self.log_path, "w"), text=True, env=env)

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"worker {self.system} exited ({self.proc.returncode}); its log ends:\n{tail}")
        return json.loads(line)

    def send(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.stdin.close()
        self.proc.wait(timeout=120)


@dataclass
class SystemResult:
    name: str
    step_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    final: dict = field(default_factory=dict)

    @property
    def median_s(self) -> float:
        return statistics.median(self.step_s)


def load_average() -> float:
    return os.getloadavg()[0]


def versions() -> dict[str, str]:
    from importlib.metadata import version

    out = {"python": platform.python_version(), "platform": platform.platform(), "cpu": _cpu_name()}
    for pkg in ("exoalign", "torch", "transformers", "trl", "accelerate", "datasets"):
        try:
            out[pkg] = version(pkg)
        except Exception:
            if pkg == "exoalign":
                import exoalign

                out[pkg] = exoalign.__version__
            else:
                out[pkg] = "missing"
    return out


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def run(shape: Shape, *, keep: Path | None = None) -> dict:
    """The whole benchmark; returns the detailed results (see :func:`summary` for the JSON written)."""
    import torch

    with tempfile.TemporaryDirectory(prefix="exoalign-bench-") as tmp:
        work = keep or Path(tmp)
        assets = work / "assets"
        assets.mkdir(parents=True, exist_ok=True)
        t_start, load_start = time.perf_counter(), load_average()
        torch.set_num_threads(shape.threads)
        make_assets(shape, assets)
        from transformers import AutoConfig

        params = _param_count(assets / "policy", AutoConfig)
        # Setup is not timed, so the workers start together; the timed steps then run one at a time.
        workers = [Worker(name, shape, assets, work) for name in shape.systems]
        for w in workers:
            assert w.read().get("ready"), w.system
        results = {w.system: SystemResult(w.system) for w in workers}
        loads = []
        for i in range(shape.warmup + shape.steps):
            for w in workers:  # A B C A B C …
                msg = w.send("step")
                r = results[w.system]
                r.losses.append(msg["loss"])
                if i >= shape.warmup:
                    r.step_s.append(msg["step_s"])
                    r.cpu_s.append(msg["cpu_s"])
            loads.append(load_average())
        for w in workers:
            results[w.system].final = w.send("done")
            w.close()

        # In this process, after the workers are gone: nothing else runs while it is timed.
        pre = run_prefix(shape, assets)
        prefix, peaks = pre["prefix"], pre["peaks"]
        return {"shape": asdict(shape), "params": params, "peak_gflops": max(peaks), "peaks": peaks,
                "systems": {k: asdict(v) | {"median_s": v.median_s} for k, v in results.items()},
                "prefix": prefix, "versions": versions(), "load_start": load_start, "load_end": load_average(),
                "load_during_steps": loads,
                "wall_s": time.perf_counter() - t_start}


def _param_count(path: Path, auto_config: Any) -> int:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(auto_config.from_pretrained(path))
    return sum(p.numel() for p in model.parameters())


def flops(params: int, final: dict) -> float:
    """Model FLOPs of one step: 6·N per policy token (forward + backward), 2·N per reference token."""
    return 6 * params * final["policy_tokens"] + 2 * params * final["ref_tokens"]


def summary(res: dict) -> dict:
    """The JSON of ``--json``: exactly the keys the checks read."""
    s = res["systems"]
    exo, default, fastest = s["exoalign"], s["trl_default"], s["trl_fastest"]
    loss0 = [v["losses"][0] for v in s.values()]
    trl_rss = min(default["final"]["peak_rss_mb"], fastest["final"]["peak_rss_mb"])
    mfu = flops(res["params"], exo["final"]) / exo["median_s"] / (res["peak_gflops"] * 1e9)
    return {
        "speedup_vs_trl_default": default["median_s"] / exo["median_s"],
        "speedup_vs_trl_fastest": fastest["median_s"] / exo["median_s"],
        "memory_ratio_vs_trl": exo["final"]["peak_rss_mb"] / trl_rss,
        "mfu": mfu,
        "loss_match": bool(max(loss0) - min(loss0) <= LOSS_TOL),
        "prefix_sharing": {k: v["speedup"] for k, v in res["prefix"].items()},
        "versions": res["versions"],
    }


def markdown(res: dict, command: str) -> str:
    """Tables of the full results, with the command and the machine's load."""
    sh, s = res["shape"], res["systems"]
    peak = res["peak_gflops"]
    tok_per_step = sh["pairs"] * 2 * sh["completion_len"]
    lines = [
        f"Command: `{command}`  ",
        f"Machine: {res['versions']['cpu']}, {sh['threads']} threads; load average {res['load_start']:.2f} at the "
        f"start, {max(res['load_during_steps']):.2f} at most during the timed steps, {res['load_end']:.2f} at the "
        f"end; dense fp32 matmul peak {peak:.1f} GFLOP/s "
        f"(measured before and after: {', '.join(f'{p:.1f}' for p in res['peaks'])}).  ",
        f"Job: GPT-2-style, {sh['layers']} layers, width {sh['width']}, vocab {sh['vocab']} "
        f"({res['params'] / 1e6:.2f} M parameters); {sh['pairs']} pairs per step, prompts {sh['prompt_len']} and "
        f"completions {sh['completion_len']} tokens; fp32; {sh['steps']} timed steps after {sh['warmup']} warm-up "
        f"per system, interleaved.",
        "",
        "| system | median s/step | min s/step | CPU s/step | completion tokens/s | exoalign speedup | peak RSS MiB "
        "| RSS above start MiB | policy + ref tokens/step | MFU | step-0 loss | last-step loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    exo_s = s["exoalign"]["median_s"]
    for name, v in s.items():
        f = v["final"]
        mfu = flops(res["params"], f) / v["median_s"] / (peak * 1e9)
        lines.append(
            f"| {name} | {v['median_s']:.3f} | {min(v['step_s']):.3f} | {statistics.median(v['cpu_s']):.2f} "
            f"| {tok_per_step / v['median_s']:.0f} "
            f"| {v['median_s'] / exo_s:.2f}× | {f['peak_rss_mb']:.0f} | {f['peak_rss_mb'] - f['baseline_rss_mb']:.0f} "
            f"| {f['policy_tokens']} + {f['ref_tokens']} | {mfu:.1%} | {v['losses'][0]:.6f} | {v['losses'][-1]:.6f} |"
        )
    lines += ["", f"Prompt sharing, forward + backward of the loss, {sh['prefix_groups']} group(s) per batch, "
              f"prompt {sh['prefix_prompt']} tokens, completions {sh['prefix_completion']}:", "",
              "| K | unshared s | shared s | speedup | loss difference |", "|---|---|---|---|---|"]
    for k, v in res["prefix"].items():
        lines.append(f"| {k} | {v['unshared_s']:.3f} | {v['shared_s']:.3f} | {v['speedup']:.2f}× | {v['loss_diff']:.1e} |")
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer steps and systems: under 3 minutes")
    p.add_argument("--tiny", action="store_true", help="a tiny model and job (seconds; for tests)")
    p.add_argument("--json", type=Path, help="write the summary JSON here")
    p.add_argument("--md", type=Path, help="write the Markdown tables here")
    p.add_argument("--details", type=Path, help="write every measurement (JSON) here")
    p.add_argument("--steps", type=int, help="timed steps per system (overrides the preset)")
    p.add_argument("--profile", action="store_true", help="only profile one exoalign step by operator family")
    p.add_argument("--render", type=Path, help="re-render the JSON and tables from a --details file (no run)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    p.add_argument("--assets", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        d = json.loads(args.shape)
        worker_main(args.worker, Shape(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}),
                    args.assets, args.work)
        return 0
    overrides = TINY if args.tiny else QUICK if args.quick else {}
    shape = Shape(**overrides)
    if args.steps:
        shape.steps = args.steps
    if args.profile:
        import torch

        torch.set_num_threads(shape.threads)
        with tempfile.TemporaryDirectory(prefix="exoalign-profile-") as tmp:
            make_assets(shape, Path(tmp))
            prof = profile_step(shape, Path(tmp))
        print("| phase of one step | wall s (median) |\n|---|---|")
        for name, t in prof["phases"]:
            print(f"| {name} | {t:.3f} |")
        total = sum(t for _, t in prof["families"])
        print("\n| forward + backward by operator family | self s | share |\n|---|---|---|")
        for fam, t in prof["families"]:
            print(f"| {fam} | {t:.3f} | {t / total:.0%} |")
        return 0
    command = "python benchmarks/throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.render:
        res = json.loads(args.render.read_text())
        command = res.get("command", command)
    else:
        res = run(shape)
        res["command"] = command.strip()
    out = summary(res)
    print(markdown(res, command.strip()))
    print(json.dumps(out, indent=2))
    if args.json:
        _atomic_write(args.json, json.dumps(out, indent=2) + "\n")
    if args.md:
        _atomic_write(args.md, markdown(res, command.strip()))
    if args.details:
        _atomic_write(args.details, json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
