"""The systems the throughput benchmark times (``benchmarks/throughput.py`` is the harness that times them).

Each system runs in its own worker process and speaks a step protocol with the harness (:class:`Channel`):
the harness says ``step``, the worker runs one training step of its system and answers with the step's wall
and CPU seconds and its loss. Systems:

* ``exoalign``          — ``exoalign.train.loop.train``: the library's own loop (reference log-probs cached
  before training, prompt sharing on), fp32;
* ``exoalign_bf16``     — the same under bf16 autocast (``train.mixed_precision=bf16``);
* ``exoalign_unshared`` — the same with prompt sharing off;
* ``exoalign_compiled``, ``exoalign_compiled_bf16`` — ``exoalign`` and ``exoalign_bf16`` with ``train.compile``
  (inductor, each decoder layer compiled once; the compiling happens in the warm-up steps);
* ``exoalign_k4``       — the listwise job: groups of K = 4 completions (the pair's two and two more drawn from
  the same token stream), EXO with reward targets;
* ``trl_default``       — ``trl.DPOTrainer`` with its defaults (gradient checkpointing as TRL sets it) and
  ``loss_type="exo_pair"``, ``label_smoothing=1e-3``, fp32 (``bf16=False``);
* ``trl_fastest``       — the same with ``precompute_ref_log_probs=True`` and gradient checkpointing off;
* ``trl_fastest_bf16``  — that under bf16 autocast (``bf16=True``).

Models (``Shape.model``): ``gpt2-14m``, a GPT-2-style model built from a config with a fixed seed, and
``smollm2``, SmolLM2-135M-Instruct's weights (``exoalign.zoo.resolve_model_path("smollm2")``). Both are driven
through a word-level tokeniser that maps the word ``w{i}`` to id ``i``, so both systems see the same token ids.
The reference is a second model of the same shape (another seed; for SmolLM2 its weights times ``1 + 0.02 z``),
so that the step-0 loss is not the trivial ``KL([½, ½] ‖ [1 − ε, ε])`` and its agreement checks the log-prob code.
"""

from __future__ import annotations

import functools
import json
import math
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

# ------------------------------------------------------------------------------------------ shapes
LOSS_TOL = 1e-4  # step-0 losses of all systems must agree this closely


@dataclass
class Shape:
    """Everything that defines the job; the presets below are the full run, --quick and --tiny (tests)."""

    model: str = "gpt2-14m"  # gpt2-14m (built from a config) or smollm2 (SmolLM2-135M-Instruct's weights)
    device: str = "cpu"  # cpu or cuda (benchmarks/gpu_check.sh); memory is peak RSS on CPU, peak allocated on CUDA
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
    # A second interleaved phase after the first (fewer processes alive at once: SmolLM2 workers take GBs).
    extra: tuple[str, ...] = ("exoalign_bf16", "exoalign_k4")

    @property
    def dtype(self) -> str:
        return "fp32"  # of the headline rows; the *_bf16 rows run under bf16 autocast

    @property
    def rows(self) -> int:
        return (self.warmup + self.steps + 1) * self.pairs  # +1: the exoalign hook stops at the next step


QUICK = dict(warmup=1, steps=2, prefix_groups=1, prefix_steps=1, prefix_warmup=0,
             systems=("exoalign", "trl_default", "trl_fastest"), extra=("exoalign_bf16", "exoalign_k4"))
TINY = dict(layers=2, width=64, heads=2, vocab=512, positions=128, prompt_len=8, completion_len=8, pairs=2,
            warmup=1, steps=1, prefix_prompt=16, prefix_completion=4, prefix_ks=(2, 4), prefix_groups=1,
            prefix_steps=1, systems=("exoalign", "trl_default", "trl_fastest"), extra=("exoalign_bf16", "exoalign_k4"))
#: SmolLM2-135M: 8 pairs, prompt 64 / completion 64. Three processes per phase (each holds two models and
#: AdamW state, ~3 GB idle, up to ~8 GB in a step).
#: Two warm-up steps: the first step after the optimiser state exists still pays for first-touch page faults
#: (up to 2× its steady time on this CPU), for every system alike.
SMOLLM2 = dict(model="smollm2", vocab=49152, positions=2048, warmup=2, steps=4,
               systems=("exoalign", "trl_default", "trl_fastest"),
               extra=("exoalign_bf16", "exoalign_k4", "trl_fastest_bf16"))
#: --quick keeps the headline systems and the bf16 row; the listwise and TRL bf16 rows are in the full run.
SMOLLM2_QUICK = dict(SMOLLM2, warmup=2, steps=2, prefix_groups=1, prefix_steps=1, prefix_warmup=0,
                     extra=("exoalign_bf16",))
MODELS = ("gpt2-14m", "smollm2")


def preset(model: str, quick: bool = False, tiny: bool = False) -> Shape:
    """The shape for ``--model`` / ``--quick`` / ``--tiny``."""
    if tiny:
        return Shape(**TINY)
    if model == "smollm2":
        return Shape(**(SMOLLM2_QUICK if quick else SMOLLM2))
    return Shape(**(QUICK if quick else {}))


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
    if shape.model == "smollm2":
        _smollm2_models(shape, tok, root)
    else:
        config = tiny_config(shape.vocab, n_layer=shape.layers, n_embd=shape.width, n_head=shape.heads,
                             n_positions=shape.positions, bos_token_id=0, eos_token_id=0, pad_token_id=1)
        for name, seed in (("policy", shape.seed), ("reference", shape.seed + 1)):
            model = build_model(config, seed=seed, tokenizer=tok)
            model.save_pretrained(root / name)
            tok.save_pretrained(root / name)
    g = torch.Generator().manual_seed(shape.seed)
    rows, groups = [], []
    p, c = shape.prompt_len, shape.completion_len - 1  # EOS is appended by both pipelines
    for _ in range(shape.rows):
        ids = torch.randint(2, shape.vocab, (p + 4 * c,), generator=g).tolist()
        # Completions start with a space: TRL tokenises prompt + completion as one text.
        comps = [" " + words(ids[p + k * c : p + (k + 1) * c]) for k in range(4)]
        rows.append({"prompt": words(ids[:p]), "chosen": comps[0], "rejected": comps[1]})
        # The listwise job: the same prompt and pair, and two more completions from the same stream.
        groups.append({"prompt": words(ids[:p]), "completions": comps,
                       "rewards": torch.randn(4, generator=g).tolist()})
    for name, data in (("pairs.jsonl", rows), ("groups.jsonl", groups)):
        with open(root / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in data)


def _smollm2_models(shape: Shape, tok: Any, root: Path) -> None:
    """SmolLM2-135M-Instruct as the policy; the reference is its weights times ``1 + 0.02 z`` (seeded)."""
    import torch
    from transformers import AutoModelForCausalLM

    from exoalign.zoo import resolve_model_path

    src = resolve_model_path("smollm2")
    for name in ("policy", "reference"):
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        if model.config.vocab_size != shape.vocab:
            raise RuntimeError(f"{src} has vocab {model.config.vocab_size}, the benchmark expects {shape.vocab}")
        if name == "reference":
            g = torch.Generator().manual_seed(shape.seed + 1)
            with torch.no_grad():
                for param in model.parameters():
                    param.mul_(1 + 0.02 * torch.randn(param.shape, generator=g))
        model.config.bos_token_id = model.config.eos_token_id = 0
        model.config.pad_token_id = 1
        model.generation_config.bos_token_id = model.generation_config.eos_token_id = 0
        model.generation_config.pad_token_id = 1
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)


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
        import torch

        if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
            extra["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
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


def run_exoalign(shape: Shape, assets: Path, work: Path, ch: Channel, prefix_sharing: bool, bf16: bool = False,
                 listwise: bool = False, compile: bool = False) -> None:
    """``exoalign.train.loop.train`` on the pairs (or the K = 4 groups); a hook around the Trainer's ``compute_loss``
    paces the steps."""
    from exoalign.train import loop, trainer
    from exoalign.train.config import DataConfig, LossConfig, ModelConfig, TrainArgs, TrainConfig

    cfg = TrainConfig(
        model=ModelConfig(name_or_path=str(assets / "policy"), ref_name_or_path=str(assets / "reference")),
        data=DataConfig(train_file=str(assets / ("groups.jsonl" if listwise else "pairs.jsonl")),
                        max_length=shape.prompt_len + shape.completion_len, max_prompt_length=shape.prompt_len),
        loss=(LossConfig(name="exo", target="rw", beta_pi=0.1, beta_r=0.1) if listwise
              else LossConfig(name="exo", target="pref", beta_pi=0.1, eps=1e-3)),
        train=TrainArgs(output_dir=str(work / "run"), lr=1e-6, batch_size=shape.pairs,
                        max_steps=shape.warmup + shape.steps + 1, seed=shape.seed, cpu=shape.device == "cpu",
                        ref_cache_dir=str(work / "ref-cache"), prefix_sharing=prefix_sharing,
                        mixed_precision="bf16" if bf16 else "no", compile=compile),
    )
    inner = trainer.compute_loss  # the Trainer passes train.prefix_sharing to it
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
    trainer.compute_loss = paced
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


def run_trl(shape: Shape, assets: Path, work: Path, ch: Channel, fastest: bool, bf16: bool = False) -> None:
    """``trl.DPOTrainer`` (exo_pair) on the same pairs in exoalign's data order; a callback paces the steps.

    Default: TRL's defaults (its gradient checkpointing included). Fastest: reference log-probs precomputed and
    gradient checkpointing off."""
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
        loss_type=["exo_pair"], label_smoothing=1e-3, beta=0.1, learning_rate=1e-6, bf16=bf16, use_cpu=shape.device == "cpu",
        report_to="none", save_strategy="no", seed=shape.seed, disable_tqdm=True,
        precompute_ref_log_probs=fastest, **({"gradient_checkpointing": False} if fastest else {}),
    )
    trainer = Trainer(model=model, ref_model=ref, args=config, train_dataset=Dataset.from_list(rows),
                      processing_class=tok, callbacks=[Pace()])
    ch.send(ready=True)
    if ch.wait():
        trainer.train()
    n = shape.pairs * 2 * (shape.prompt_len + shape.completion_len)
    ch.finish(policy_tokens=n, ref_tokens=0 if fastest else n,
              gradient_checkpointing=bool(getattr(trainer.args, "gradient_checkpointing", False)))


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak(device: str = "cpu", dtype: str = "float32") -> float:
    """Dense matmul GFLOP/s in ``dtype``: the best of a few square sizes, as ``a @ b`` and as ``F.linear(a, b)``
    (a layer's product, ``a @ bᵀ``: on a CPU without bf16 units torch multiplies bf16 through other kernels for
    the two, ~5× apart on an AMD EPYC Zen 3, so the best of both is the limit a model meets), and in fp32 on CPU
    also through oneDNN's linear (``exoalign.gemm``; on AMD processors MKL, torch's fp32 default, skips its
    AVX-512 path and oneDNN runs ~1.3× faster, so a peak of MKL's alone would understate the limit). Each size: two
    products of warm-up, then at least two timed (4 GFLOP on CPU); a product that takes over 0.5 s alone gives
    the rate of that size, and larger sizes are not tried (bf16 there: minutes otherwise)."""
    import torch
    import torch.nn.functional as F

    best = 0.0
    dt = getattr(torch, dtype)
    cap = 4e9 if device == "cpu" else 4e12  # FLOPs per timing at most
    products = [torch.matmul, F.linear]
    if device == "cpu" and dt == torch.float32:
        from exoalign import gemm

        if gemm._onednn_available():
            products.append(gemm._lin)
    for product in products:
        for n in (512, 1024, 2048) if device == "cpu" else (4096, 8192):
            a, b = torch.randn(n, n, device=device, dtype=dt), torch.randn(n, n, device=device, dtype=dt)
            product(a, b)  # warm-up (kernel selection, packing)
            _sync(device)
            t = time.perf_counter()
            product(a, b)
            _sync(device)
            one = time.perf_counter() - t
            if one > 0.5:  # a slow path: this one product tells its rate
                best = max(best, 2 * n**3 / one / 1e9)
                break
            reps = max(2, int(cap / (2 * n**3)))
            t = time.perf_counter()
            for _ in range(reps):
                product(a, b)
            _sync(device)
            best = max(best, 2 * n**3 * reps / (time.perf_counter() - t) / 1e9)
    return best


def run_prefix(shape: Shape, assets: Path) -> dict:
    """The matmul peak, then forward + backward of the EXO loss on K-completion groups with and without
    prompt sharing, then the peak again (the best of the two is the limit)."""
    import torch

    from exoalign.attention import training_attention
    from exoalign.data import GroupCollator
    from exoalign.models import load_causal_lm
    from exoalign.packing import supports_shared_prefix
    from exoalign.train.config import LossConfig

    peaks = [matmul_peak(shape.device)]
    model = load_causal_lm(str(assets / "policy")).to(shape.device)
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
        batch = {k: v.to(shape.device) if hasattr(v, "to") else v for k, v in GroupCollator(1)(feats).items()}
        times: dict[bool, list[float]] = {False: [], True: []}
        losses: dict[bool, float] = {}
        for i in range(shape.prefix_warmup + shape.prefix_steps):
            for share in (False, True):  # interleaved
                t = time.perf_counter()
                with training_attention():  # as the trainer's micro-step runs forward and backward
                    loss, _ = fns[share](model, batch, loss_cfg)
                    loss.backward()
                model.zero_grad(set_to_none=True)
                _sync(shape.device)
                if i >= shape.prefix_warmup:
                    times[share].append(time.perf_counter() - t)
                losses[share] = float(loss.detach())
        unshared, shared = statistics.median(times[False]), statistics.median(times[True])
        result[str(K)] = {"unshared_s": unshared, "shared_s": shared, "speedup": unshared / shared,
                          "loss_diff": abs(losses[True] - losses[False])}
        print(f"prompt sharing K={K}: unshared {unshared:.2f} s, shared {shared:.2f} s ({unshared / shared:.2f}x)",
              file=sys.stderr, flush=True)
    peaks.append(matmul_peak(shape.device))
    # The limit of the bf16-autocast rows: their matmuls run in bf16 (AMX on recent Xeons, tensor cores on GPUs).
    return {"prefix": result, "peaks": peaks, "peak_bf16": matmul_peak(shape.device, "bfloat16")}


FAMILIES = {
    "matmul (linear layers, LM head)": ("aten::mm", "aten::addmm", "aten::bmm", "mkldnn::_linear_pointwise"),
    "attention (SDPA)": ("scaled_dot_product",),
    "elementwise (activations, norms, rotary, log-softmax)": (
        "aten::mul", "aten::pow", "aten::tanh", "aten::sigmoid", "aten::silu", "aten::sub", "aten::div",
        "aten::neg", "aten::exp", "aten::rsqrt", "aten::where", "aten::masked_fill", "aten::log"),
    "layer norm": ("layer_norm",),
    "copies, casts, cat, fill (layouts, bf16 weights)": ("aten::copy_", "aten::cat", "aten::fill_", "aten::zero_"),
    "adds and sums (residuals, bias grads)": ("aten::add", "aten::sum"),
}

#: The dense products a step is made of (what the matmul floor replays): aten's, and oneDNN's linear, which
#: ``exoalign.gemm`` uses for fp32 forward and input-gradient products on AMD CPUs with AVX-512.
_MATMULS = ("mm", "addmm", "bmm", "baddbmm")
_ONEDNN_LINEAR = "mkldnn._linear_pointwise"


def _matmul_op(name: str):
    import torch

    if name == _ONEDNN_LINEAR:
        return torch.ops.mkldnn._linear_pointwise.default
    return getattr(torch.ops.aten, name).default


def record_matmuls():
    """A context manager (a torch dispatch mode) that lists every dense product run inside it, forward and backward:
    ``(op, [(shape, stride, dtype) or a scalar, …])`` per call, in order. The inputs' values are not kept."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    names = _MATMULS + ((_ONEDNN_LINEAR,) if hasattr(torch.ops.mkldnn, "_linear_pointwise") else ())
    ops = {_matmul_op(name): name for name in names}

    class Recorder(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[tuple[str, list]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in ops:
                self.calls.append((ops[func], [(tuple(a.shape), a.stride(), a.dtype) if isinstance(a, torch.Tensor)
                                               else a for a in args]))
            return func(*args, **(kwargs or {}))

    return Recorder()


def matmul_flops(op: str, args: list) -> int:
    """Multiply-adds × 2 of one recorded product (``mm``/``addmm``: ``[m, k] @ [k, n]``; the batched forms per batch;
    oneDNN's linear: ``[…, k]`` by a ``[n, k]`` weight)."""
    if op == _ONEDNN_LINEAR:
        (sx, sw) = (args[0][0], args[1][0])
        return 2 * math.prod(sx[:-1]) * sx[-1] * sw[0]
    a, b = (args[1], args[2]) if op in ("addmm", "baddbmm") else (args[0], args[1])
    (sa, sb) = (a[0], b[0])
    if op in ("mm", "addmm"):
        return 2 * sa[0] * sa[1] * sb[1]
    return 2 * sa[0] * sa[1] * sa[2] * sb[2]


def replay_matmuls(calls: list, device: str = "cpu", reps: int = 3) -> float:
    """Seconds to run the recorded products alone, in order, on inputs of the same shapes, strides and dtypes
    (random values; outputs allocated as the step allocates them): the median of ``reps`` after one warm-up."""
    import torch

    def make(spec):
        if not isinstance(spec, tuple):
            return spec
        shape, stride, dtype = spec
        size = sum((n - 1) * st for n, st in zip(shape, stride)) + 1
        return torch.randn(size, device=device).to(dtype).as_strided(shape, stride)

    ready = [(_matmul_op(op), [make(a) for a in args]) for op, args in calls]
    times = []
    for _ in range(reps + 1):
        _sync(device)
        t = time.perf_counter()
        for fn, args in ready:
            fn(*args)
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def pair_batch(shape: Shape) -> tuple[dict, Any]:
    """One collated batch of the pair job (random ids, EOS last, fixed reference log-probs) and its EXO-pref loss."""
    import torch

    from exoalign.data import GroupCollator
    from exoalign.train.config import LossConfig

    g = torch.Generator().manual_seed(shape.seed)
    c = shape.completion_len
    feats = [{"index": b, "prompt_ids": torch.randint(2, shape.vocab, (shape.prompt_len,), generator=g).tolist(),
              "completion_ids": [torch.randint(2, shape.vocab, (c - 1,), generator=g).tolist() + [0] for _ in range(2)],
              "ref_logps": [-600.0, -600.0]} for b in range(shape.pairs)]
    return GroupCollator(1)(feats), LossConfig(name="exo", target="pref", beta_pi=0.1, eps=1e-3)


def profile_step(shape: Shape, assets: Path, prefix_sharing: bool = True, steps: int = 3,
                 bf16: bool = False) -> dict[str, Any]:
    """Where one training step of the ``exoalign`` system goes, set up as the trainer sets it up on CPU (kept
    freed memory, trainable weights of their own, lean activations, the training attention, the logits' gradient
    in place, fused AdamW with the clip folded in where the loop folds it; ``bf16``: under bf16 autocast):

    * ``phases``: wall seconds of forward, backward and the optimizer (clip included), the median of ``steps``;
    * ``families``: forward + backward's self time by operator family (torch.profiler, one step; the profiler's
      own cost inflates small operators);
    * ``floor``: the step's dense products (recorded with :func:`record_matmuls`) replayed alone — their seconds,
      GFLOP/s and share of the matmul peak measured here — and ``mfu_ceiling``, the MFU the step would reach if
      everything but those products took no time (model FLOPs 6·N·tokens as in the benchmark's MFU).
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    from exoalign.attention import training_attention
    from exoalign.hardware import keep_freed_memory
    from exoalign.lean import apply_lean_activations
    from exoalign.logprobs import autocast, logits_grad_in_place
    from exoalign.models import load_causal_lm, own_trainable_weights

    keep_freed_memory(device=shape.device)
    model = load_causal_lm(str(assets / "policy")).to(shape.device)
    model.train()
    if shape.device == "cpu":
        own_trainable_weights(model)
    apply_lean_activations(model)
    batch, loss_cfg = pair_batch(shape)
    batch = {k: v.to(shape.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    fn = compute_loss_fn(prefix_sharing)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    phases: dict[str, list[float]] = {}

    def timed(name: str, f):
        _sync(shape.device)
        t = time.perf_counter()
        out = f()
        _sync(shape.device)
        phases.setdefault(name, []).append(time.perf_counter() - t)
        return out

    def fwd_bwd(clock: bool = True) -> None:
        run = timed if clock else (lambda _name, f: f())
        with training_attention():
            with autocast("bf16" if bf16 else "no", shape.device), logits_grad_in_place():
                loss, _ = run("forward (loss)", lambda: fn(model, batch, loss_cfg))
            run("backward", loss.backward)

    def update() -> None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(steps + 1):
        fwd_bwd()
        timed("clip + fused AdamW", update)
        if i == 0:
            phases.clear()  # warm-up: the optimizer state's first touch
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fwd_bwd(clock=False)
    model.zero_grad(set_to_none=True)
    families: dict[str, float] = {}
    for e in prof.key_averages():
        fam = next((f for f, keys in FAMILIES.items() if any(e.key.startswith(k) or k in e.key for k in keys)), "other")
        families[fam] = families.get(fam, 0.0) + e.self_cpu_time_total / 1e6
    with record_matmuls() as rec:
        fwd_bwd(clock=False)
    model.zero_grad(set_to_none=True)
    mm_s = replay_matmuls(rec.calls, shape.device)
    mm_flops = sum(matmul_flops(op, args) for op, args in rec.calls)
    step_s = sum(statistics.median(v) for v in phases.values())
    peak = matmul_peak(shape.device, "bfloat16" if bf16 else "float32")
    params = sum(p.numel() for p in model.parameters())
    tokens = policy_tokens(batch, prefix_sharing)
    model_flops = 6 * params * tokens
    floor = {"precision": "bf16 autocast" if bf16 else "fp32", "matmuls": len(rec.calls),
             "matmul_tflop": mm_flops / 1e12, "matmul_s": mm_s, "matmul_gflops": mm_flops / mm_s / 1e9,
             "peak_gflops": peak, "matmul_share_of_peak": mm_flops / mm_s / 1e9 / peak, "step_s": step_s,
             "matmul_share_of_step": mm_s / step_s, "tokens": tokens, "model_tflop": model_flops / 1e12,
             "mfu": model_flops / step_s / 1e9 / peak, "mfu_ceiling": model_flops / mm_s / 1e9 / peak}
    return {"phases": [(k, statistics.median(v)) for k, v in phases.items()],
            "families": sorted(families.items(), key=lambda kv: -kv[1]), "floor": floor}


def worker_main(system: str, shape: Shape, assets: Path, work: Path) -> None:
    ch = Channel()
    _setup(shape, work)
    if system.startswith("exoalign"):
        run_exoalign(shape, assets, work, ch, prefix_sharing=system != "exoalign_unshared",
                     bf16=system.endswith("_bf16"), listwise=system == "exoalign_k4",
                     compile=system.startswith("exoalign_compiled"))
    elif system.startswith("trl"):
        run_trl(shape, assets, work, ch, fastest=system.startswith("trl_fastest"), bf16=system.endswith("_bf16"))
    else:
        raise SystemExit(f"unknown system {system}")


