"""The demo's settings: everything its numbers depend on, the presets, and which stage reads which."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

OFFLINE_METHODS = ("exo-rw", "dpo-rw", "exo-pref", "dpo-pref")
"""The offline runs, ``{loss}-{target}``: EXO and DPO with reward targets (all K scored completions) and with
preference targets (the best-vs-worst pair), all on the same samples of π_sft. The rw runs (K completions per
prompt, about twice the work of a pair) come first so that two workers finish together."""
ONLINE_LOSSES = {"online-exo": "exo", "online-dpo": "dpo", "rloo": "rloo", "ppo": "ppo"}
"""Methods that sample from the current policy each round (``exoalign train`` with ``online.rounds``) and the
registry loss each trains with: EXO and DPO with the importance-corrected rw targets, RLOO's leave-one-out
policy gradient and PPO's clipped surrogate on the KL-shaped reward (docs/online.md)."""
ONLINE_METHODS = tuple(ONLINE_LOSSES)
DEFAULT_METHODS = ("exo-rw", "dpo-rw", "online-exo", "rloo")
"""``exoalign demo``: offline EXO and DPO with reward targets on π_sft's samples, online EXO and RLOO."""
FULL_METHODS = ("exo-rw", "dpo-rw", "online-exo", "online-dpo", "rloo", "ppo")
"""``exoalign demo --full``: the powered experiment's six methods."""
METHODS = tuple(tuple(m.split("-")) for m in OFFLINE_METHODS)
"""(loss, target) of the offline runs (kept for callers of the first demo)."""
SCRATCH = "scratch"
"""``model=scratch``: the toy π_sft, a small GPT-2 trained from scratch on the review grammar."""


@dataclass(frozen=True)
class DemoSettings:
    """Everything the demo's numbers depend on (recorded in results.json and report.md)."""

    seed: int = 0
    """Seed of the corpus, π_sft's initialisation (scratch), sampling and training."""
    model: str = "smollm2"
    """π_sft: a model name (smollm2) or directory, aligned as it is; 'scratch' = a toy GPT-2 trained on the grammar."""
    prompt_format: str = "chat"
    """Real models: 'chat' (the opening inside the chat template after `instruction`) or 'raw' (the bare opening)."""
    instruction: str = "Continue this movie review: "
    """prompt_format=chat: the user turn is this text followed by the review's opening."""
    n_sft_reviews: int = 6000
    """scratch: reviews π_sft is trained on."""
    n_train_prompts: int = 36
    """Prompts for which π_sft's completions are sampled, scored and used to align (openings of other reviews)."""
    n_eval_prompts: int = 40
    """Held-out prompts every checkpoint is evaluated on."""
    vocab_size: int = 1024
    """scratch: byte-level BPE vocabulary trained on the SFT rows."""
    n_layer: int = 4
    """scratch: π_sft transformer blocks."""
    n_embd: int = 128
    """scratch: π_sft width."""
    n_head: int = 4
    """scratch: π_sft attention heads."""
    max_length: int = 96
    """Tokens of prompt + completion in training."""
    max_prompt_length: int = 64
    """Longest prompt in tokens (the chat template adds ~35 tokens to an opening)."""
    sft_steps: int = 400
    """scratch: SFT optimizer steps."""
    sft_batch_size: int = 32
    """scratch: SFT rows per step."""
    sft_lr: float = 3e-3
    """scratch: SFT peak learning rate (cosine decay, warm-up 5%)."""
    k: int = 4
    """Completions sampled per training prompt; rw runs use all K, pref runs the best-vs-worst pair."""
    temperature: float = 1.0
    """Sampling temperature of the training completions and of evaluation (KL measured at it)."""
    max_new_tokens: int = 24
    """Longest completion, in tokens."""
    sample_dtype: str = "auto"
    """Real models: weights of the sample stage's and the evaluation's sampling: bfloat16 samples from a bf16 copy (~2×
    faster on CPUs with bf16 units); the samples are then the bf16 model's, and the evaluation measures the bf16
    models (reward of their samples, KL between their bf16 copies); online runs sample each round from a bf16 copy of
    the policy (``online.sample_dtype``). 'model' = as loaded (fp32). 'auto' = bfloat16 where the device has bf16
    matmul units, else model (an AVX2-only CPU multiplies bf16 several times slower than fp32;
    ``exoalign.hardware.fast_bf16``). Training keeps fp32 weights."""
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    """Runs to train and compare: offline exo-rw, dpo-rw, exo-pref, dpo-pref; online online-exo, online-dpo, rloo, ppo."""
    beta_pi: list[float] = field(default_factory=lambda: [1.0])
    """β_π values (the DPO β): every method runs once per value; its frontier is the envelope over them."""
    beta_r: float = 0.1
    """β_r of the rw targets softmax(r/β_r); rewards lie in [-1, 1] (pref targets use eps instead)."""
    eps: float = 1e-3
    """Label smoothing ε of the pref targets [1-ε, ε]."""
    align_steps: int = 12
    """Optimizer steps of each alignment run."""
    align_batch_size: int = 3
    """Prompts per alignment step (pref: that many pairs; rw: that many groups of K)."""
    align_lr: float = 2e-5
    """Alignment learning rate (constant after a short warm-up)."""
    mixed_precision: str = "auto"
    """Training compute: bf16 autocast (fp32 weights and optimizer; ~2x faster on CPUs with bf16 units) or fp32;
    'auto' = bf16 where the device has bf16 matmul units, else fp32 (see ``sample_dtype``)."""
    save_every: int = 3
    """Checkpoint (and evaluate) every this many alignment steps (kept as weights only, deleted once evaluated)."""
    online_rounds: int = 12
    """Online methods: rounds of sample K from π_t → score → one step (each round = align_batch_size prompts,
    so online_rounds = align_steps sees as many prompts and samples as an offline run)."""
    online_steps_per_round: int = 1
    """Online methods: optimizer steps per round (each of align_batch_size × online_reuse / this many groups)."""
    online_reuse: int = 1
    """Online methods: times each round's samples are used (2 with 2 steps per round = PPO-style reuse with the
    same prompts per step; offline runs then take as many steps, i.e. online_reuse epochs over π_sft's samples)."""
    online_beta_pi: float = 1.0
    """β_π of the online runs (1 makes p uniform at each round's start: the corrected targets of docs/online.md)."""
    eval_samples: int = 1
    """Completions per held-out prompt and checkpoint."""
    n_bootstrap: int = 2000
    """Paired bootstrap resamples of the held-out prompts behind the verdict's intervals."""
    gen_batch_size: int = 128
    """Prompts per generation batch (the sample stage's 72 prompts of the old default in one batch instead of 64 + 8:
    14.6 vs 16.7 s on 2 cores; docs/speed.md). Memory grows with prompts × K × length."""
    workers: int = 0
    """Parallel job processes on a CPU (0 = one per usable core; 1 = run every job in this process)."""
    keep_checkpoints: bool = False
    """Keep each run's evaluated checkpoints (weights only); by default they are deleted once evaluated."""

    @property
    def scratch(self) -> bool:
        return self.model == SCRATCH

    def __post_init__(self) -> None:
        from ..config import require

        for name in ("n_sft_reviews", "n_train_prompts", "n_eval_prompts", "n_layer", "n_embd", "n_head",
                     "sft_steps", "sft_batch_size", "max_new_tokens", "align_steps", "align_batch_size",
                     "save_every", "eval_samples", "gen_batch_size", "max_prompt_length"):
            require(getattr(self, name) >= 1, name, "must be at least 1", "use a positive whole number")
        require(self.n_eval_prompts >= 2, "n_eval_prompts", "must be at least 2", "use e.g. 48")
        require(self.k >= 2, "k", f"K must be at least 2 (got {self.k})", "use k=2 or more")
        require(self.save_every <= self.align_steps, "save_every", "must not exceed align_steps",
                "checkpoint at least once, e.g. save_every=align_steps")
        require(self.n_embd % self.n_head == 0, "n_head", "must divide n_embd", "e.g. n_embd=128 with n_head=4")
        require(self.prompt_format in ("chat", "raw"), "prompt_format", f"unknown format {self.prompt_format!r}",
                "use chat or raw")
        require(bool(self.model), "model", "is empty", "use smollm2, a model directory or scratch")
        known = OFFLINE_METHODS + ONLINE_METHODS
        bad = [m for m in self.methods if m not in known]
        require(not bad and bool(self.methods), "methods", f"unknown method(s) {bad}" if bad else "is empty",
                f"choose from {', '.join(known)}")
        require(len(set(self.methods)) == len(self.methods), "methods", "lists a method twice", "list each once")
        require(bool(self.beta_pi) and all(b > 0 for b in self.beta_pi), "beta_pi", "needs positive values",
                "e.g. beta_pi=[0.1,1.0]")
        require(len(set(self.beta_pi)) == len(self.beta_pi), "beta_pi", "lists a value twice", "list each once")
        require(self.beta_r > 0, "beta_r", "must be > 0", "e.g. beta_r=0.1")
        require(self.n_bootstrap >= 100, "n_bootstrap", "must be at least 100", "use e.g. 2000")
        require(self.mixed_precision in ("auto", "bf16", "fp32"), "mixed_precision",
                f"unknown {self.mixed_precision!r}", "use auto, bf16 or fp32")
        require(self.online_rounds >= 1 and self.online_steps_per_round >= 1, "online_rounds",
                "online_rounds and online_steps_per_round must be at least 1", "use e.g. online_rounds=16")
        require(self.online_reuse >= 1, "online_reuse", "must be at least 1", "use 1 (each sample used once)")
        require((self.align_batch_size * self.online_reuse) % self.online_steps_per_round == 0,
                "online_steps_per_round", "must divide align_batch_size × online_reuse (each round's groups, "
                "used online_reuse times, are split over its steps)", "use 1")
        missing = [m for m in self.methods if m in ONLINE_LOSSES and not _registered(ONLINE_LOSSES[m])]
        require(not missing, "methods", f"{missing} need(s) the loss {[ONLINE_LOSSES[m] for m in missing]}, "
                "which this exoalign does not have", "leave it out of methods=[…]")
        require(self.workers >= 0, "workers", "must be >= 0", "0 = one per core")
        require(self.sample_dtype in ("auto", "model", "bfloat16"), "sample_dtype", f"unknown {self.sample_dtype!r}",
                "use auto, bfloat16 or model")

    def for_device(self, device: str) -> DemoSettings:
        """These settings with ``auto`` precisions made concrete for ``device`` (bf16 only where it is fast), so
        fingerprints, workers and the report see what ran."""
        from ..hardware import fast_bf16, resolve_sample_dtype

        changes = {"sample_dtype": resolve_sample_dtype(self.sample_dtype, device)}
        if self.mixed_precision == "auto":
            changes["mixed_precision"] = "bf16" if fast_bf16(device) else "fp32"
        return dataclasses.replace(self, **changes)


def _registered(loss: str) -> bool:
    from ..losses import LOSSES

    return loss in LOSSES


SCRATCH_PRESET = dict(
    n_train_prompts=1024, n_eval_prompts=128, max_length=96, max_prompt_length=24, max_new_tokens=48,
    align_steps=200, align_batch_size=16, align_lr=5e-5, save_every=50, eval_samples=2, mixed_precision="fp32",
    online_rounds=200, methods=list(OFFLINE_METHODS), beta_pi=[0.1, 1.0], keep_checkpoints=True,
)
"""``model=scratch``: the toy of the first demo (a 0.9M-parameter GPT-2 trained on the grammar, ~10 min)."""
QUICK_SCRATCH = dict(
    n_sft_reviews=2000, n_train_prompts=96, n_eval_prompts=48, vocab_size=768, n_layer=2, n_embd=64, n_head=2,
    sft_steps=150, sft_lr=5e-3, k=4, max_new_tokens=32, max_prompt_length=24, align_steps=24, align_batch_size=8,
    align_lr=2e-4, save_every=8, eval_samples=1, n_bootstrap=500, online_rounds=24,
)
"""``--quick --model scratch``: the same chain, tiny (the default test suite runs it)."""
QUICK_REAL = dict(
    n_train_prompts=16, n_eval_prompts=12, max_new_tokens=16, align_steps=4, align_batch_size=2, save_every=4,
    n_bootstrap=1000, online_rounds=4, methods=list(OFFLINE_METHODS), beta_pi=[0.1, 1.0], align_lr=3e-5,
)
"""``--quick`` on a real model: every stage and method, a few steps (a few minutes on 2 cores)."""
CUDA_REAL = dict(
    n_train_prompts=512, n_eval_prompts=128, max_new_tokens=48, max_length=128, align_steps=120,
    align_batch_size=8, save_every=20, eval_samples=4, beta_pi=[0.1, 0.3, 1.0], mixed_precision="fp32",
    online_rounds=120,
)
"""``--device cuda`` on a real model: more prompts, steps, tokens and β values."""
FULL_SHAPE = dict(methods=list(FULL_METHODS), beta_pi=[1.0], online_steps_per_round=2, online_reuse=2,
                  keep_checkpoints=False)
"""What every ``--full`` shares: the six methods at one β_π, each round's samples used twice over two steps."""
FULL_REAL = dict(
    FULL_SHAPE, k=4, n_train_prompts=120, align_batch_size=4, align_steps=60, online_rounds=30, save_every=10,
    align_lr=1e-5,
    n_eval_prompts=128, eval_samples=2, n_bootstrap=2000,
)
"""``--full`` on a CPU: the powered experiment, one seed in at most 2 hours on 2 quiet cores (docs/demo.md).
Every method: 60 optimizer steps of 4 prompts × K = 4 completions, 480 sampled completions each used twice
(offline: 120 prompts × 4 samples of π_sft, two epochs; online: 30 rounds of 4 prompts × 4 samples of π_t, two
steps per round), 6 checkpoints + π_sft, each on 128 held-out prompts × 2 samples."""
FULL_CUDA = dict(
    FULL_REAL, n_train_prompts=6400, align_batch_size=64, align_steps=200, online_rounds=100, save_every=20,
    n_eval_prompts=256, eval_samples=4, max_new_tokens=48, max_length=128, mixed_precision="fp32",
    align_lr=1e-6, gen_batch_size=256,
)
"""``--full --device cuda``: the paper's scale (64 prompts per step, 200 steps, 10 checkpoints per run)."""
FULL_SEEDS = (0, 1, 2)
"""The reported seeds of ``--full``. The β and lr of each method were to be chosen on seed 100 (not reported)."""


def preset(model: str, quick: bool, device: str, full: bool = False) -> dict:
    """The preset overrides for this model, size and device (applied before the user's overrides)."""
    if model == SCRATCH:
        toy = {**SCRATCH_PRESET, **(QUICK_SCRATCH if quick else {})}
        if full:  # the toy at its own sizes, with the powered experiment's methods and reuse
            toy.update(FULL_SHAPE, online_rounds=toy["align_steps"] // 2)
        return toy
    if full:
        return dict(FULL_CUDA) if device == "cuda" else dict(FULL_REAL)
    if quick:
        return dict(QUICK_REAL)
    return dict(CUDA_REAL) if device == "cuda" else {}


# Which settings each stage reads; a stage's fingerprint hashes these and the previous stage's fingerprint.
STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "corpus": ("seed", "model", "n_sft_reviews"),
    "sft": ("vocab_size", "n_layer", "n_embd", "n_head", "max_length", "sft_steps", "sft_batch_size", "sft_lr"),
    "prompts": ("n_train_prompts", "n_eval_prompts", "prompt_format", "instruction"),
    "sample": ("k", "temperature", "max_new_tokens", "max_prompt_length", "sample_dtype"),
    "score": (),
    "label": (),
    "train": ("align_steps", "align_batch_size", "align_lr", "save_every", "beta_r", "eps", "max_length",
              "mixed_precision"),
    "eval": ("eval_samples",),
}
"""For a real model the corpus and SFT stages do not run; their keys that only the toy reads are left out of
its fingerprints (see :func:`stage_keys`). ``methods`` and ``beta_pi`` are not here: each (method, β_π) run
is a job with its own fingerprint, so adding a β value or a method runs only the new runs."""
SCRATCH_ONLY = {"n_sft_reviews", "vocab_size", "n_layer", "n_embd", "n_head", "sft_steps", "sft_batch_size",
                "sft_lr"}
OMIT_AT_DEFAULT = {"prompt_format", "instruction"}
"""Keys hashed only when they differ from their default (they joined the fingerprint late: directories made
with the default chat prompts keep their cache)."""


def stage_keys(scratch: bool) -> dict[str, tuple[str, ...]]:
    """STAGE_KEYS for the toy (every key) or a real model (the toy's corpus and SFT keys dropped)."""
    if scratch:
        return {k: tuple(v for v in keys if v not in ("prompt_format", "instruction", "sample_dtype"))
                for k, keys in STAGE_KEYS.items()}
    return {k: tuple(v for v in keys if v not in SCRATCH_ONLY) for k, keys in STAGE_KEYS.items()}


def fmt_beta(b: float) -> str:
    return f"{b:g}"


def run_name(method: str, beta_pi: float) -> str:
    """Directory and job name of one run: ``exo-rw_bpi0.1``."""
    return f"{method}_bpi{fmt_beta(beta_pi)}"


def method_name(loss: str, target: str) -> str:
    return f"{loss}-{target}"
