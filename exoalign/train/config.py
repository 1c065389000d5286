"""Typed config of ``exoalign train`` (and the sections ``exoalign sft`` / ``exoalign rm train`` share).

A config file is YAML with four sections whose keys are the field names below::

    model: {name_or_path: gpt2, dtype: bfloat16}
    data:  {train_file: pairs.jsonl, max_length: 512}
    loss:  {name: exo, target: pref, beta_pi: 0.1}
    train: {output_dir: runs/exo, lr: 1e-6, batch_size: 8}

and any key can be overridden on the command line as ``section.key=value``. Each field is documented once, by
the string under it; ``exoalign train --help`` prints them all. Values are checked in ``__post_init__``: a bad
one raises :class:`~exoalign.errors.ConfigError` naming the key and the fix before any work starts.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config import require
from ..data import get_preset, parse_columns
from ..errors import ConfigError
from ..losses import LOSSES, check_eps, check_params, resolve_loss
from ..models import DTYPES, check_model_dir

SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "warmup_stable_decay",
)


@dataclass
class ModelConfig:
    """The policy to train: a hub name or local directory, or a tiny model built from a config."""

    name_or_path: str = ""
    """Hub name, local directory or smollm2 (offline SmolLM2-135M) of the starting model (π_sft); unused when
    init=scratch."""
    tokenizer: str | None = None
    """Tokeniser hub name or directory; defaults to name_or_path."""
    ref_name_or_path: str | None = None
    """Reference model π_sft for the log-ratio; defaults to the starting policy itself."""
    init: Literal["pretrained", "scratch"] = "pretrained"
    """pretrained: load name_or_path. scratch: build a randomly initialised model of model_type and train a
    byte-level BPE tokeniser on the training texts (no download); saved to output_dir/init."""
    model_type: str = "gpt2"
    """Architecture of a scratch model (any transformers model_type with a causal-LM head)."""
    scratch_config: dict[str, Any] = field(default_factory=dict)
    """Overrides of the scratch model's config, e.g. {n_layer: 2, n_embd: 64} (GPT-2 defaults: 2 layers, width 64)."""
    vocab_size: int = 512
    """Vocabulary size of the BPE tokeniser trained for a scratch model."""
    dtype: str = "float32"
    """Weights dtype when loading: float32, bfloat16, float16 or auto."""
    trust_remote_code: bool = False
    """Allow model code from the hub (runs code from the model repository: only for models you trust)."""
    disable_dropout: bool = True
    """Zero every dropout probability (nn.Dropout modules, dropout a module applies functionally, the config's dropout
    fields), so policy and reference log-probs are deterministic functions of the weights."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    lora_r: int = 0
    """LoRA rank (peft); 0 trains all weights. With LoRA the reference is the model with adapters disabled."""
    lora_alpha: float = 16.0
    """LoRA scaling alpha."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch."""
    lora_target_modules: list[str] = field(default_factory=list)
    """Module names to adapt with LoRA; empty = all linear layers."""

    def __post_init__(self) -> None:
        require(self.dtype in DTYPES, "dtype", f"unknown dtype {self.dtype!r}", f"use one of {', '.join(DTYPES)}")
        require(self.vocab_size >= 260, "vocab_size", "must be at least 260", "byte-level BPE needs 256 bytes + specials")
        require(self.lora_r >= 0, "lora_r", "must be >= 0", "use 0 (no LoRA) or a rank such as 8")
        require(self.lora_alpha > 0, "lora_alpha", "must be > 0", "use e.g. 16")
        require(0.0 <= self.lora_dropout < 1.0, "lora_dropout", "must be in [0, 1)", "use e.g. 0.05")


@dataclass
class DataBaseConfig:
    """Files and lengths common to every stage that trains."""

    train_file: str = ""
    """Training rows: JSONL, JSON, Parquet, a save_to_disk directory or a hub dataset name."""
    eval_file: str | None = None
    """Held-out rows in the same format (evaluated every train.eval_every steps and at the end)."""
    eval_fraction: float = 0.0
    """When eval_file is not given: hold out this fraction of the training rows (deterministic by seed)."""
    split: str = "train"
    """Split to read from a hub dataset or a DatasetDict directory."""
    max_length: int = 512
    """Maximum tokens of prompt + completion; completions are cut on the right (counted in run_info.json)."""
    max_prompt_length: int | None = None
    """Maximum prompt tokens; longer prompts keep their last tokens (truncated from the left). null = 256, or half
    of max_length when that is shorter (online: at most max_length - online.max_new_tokens)."""
    preset: str | None = None
    """A published dataset's schema, read as it is: hh-rlhf, ultrafeedback, ultrafeedback-binarized, shp or
    pku-saferlhf (docs/data.md lists the rows each expects)."""
    columns: dict[str, Any] | str | None = None
    """Map the source's fields onto ours, e.g. {prompt: instruction, completions: completions[].response,
    rewards: completions[].overall_score} ([] = every item of a list; applied before the preset)."""

    def __post_init__(self) -> None:
        self.columns = parse_columns(self.columns, "columns")
        if self.preset:
            get_preset(self.preset, "preset")
        require(self.max_length >= 2, "max_length", "must be at least 2", "use e.g. 512")
        self.prompt_length_auto = self.max_prompt_length is None  # not a field: a default that may still adapt
        if self.max_prompt_length is None:
            self.max_prompt_length = min(256, self.max_length // 2)
        require(
            0 < self.max_prompt_length < self.max_length,
            "max_prompt_length",
            f"must be in [1, max_length) (got {self.max_prompt_length} with max_length {self.max_length})",
            "leave room for the completion: max_prompt_length < max_length",
        )
        require(0.0 <= self.eval_fraction < 1.0, "eval_fraction", "must be in [0, 1)", "use e.g. 0.1, or 0 for none")


@dataclass
class DataConfig(DataBaseConfig):
    """Preference data: pairs or groups of K completions with rewards."""

    k: int | None = None
    """Completions per group used for training (>= 2); null = all of each row's completions. Pairs have 2."""
    k_select: Literal["best_worst", "random", "first"] = "best_worst"
    """How rows with more than k completions are cut down: best_worst keeps the top ceil(k/2) and bottom
    floor(k/2) by reward; random keeps a seeded random subset; first keeps the first k."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.k is None or self.k >= 2, "k", f"K must be at least 2 (got {self.k})", "use k >= 2 or null (all)")


@dataclass
class LossConfig:
    """Which loss from the registry and its hyper-parameters."""

    name: str = "exo"
    """A registered loss (exo, dpo, ipo, cdpo, simpo, rpo, hinge; rloo, ppo online; any added by
    exoalign.register_loss), or a user's loss as path/to/file.py:function or module:function (docs/losses.md)."""
    target: Literal["pref", "rw"] = "pref"
    """Target distribution over the K completions: pref = [1-eps, eps] on (chosen, rejected) pairs; rw =
    softmax(rewards / beta_r) (needs rewards in the data)."""
    beta_pi: float = 0.1
    """β_π: scale of the policy log-ratio inside the softmax (the DPO β)."""
    beta_r: float = 0.1
    """β_r: temperature of the reward targets; the effective KL coefficient is β_π·β_r."""
    eps: float = 1e-3
    """Label smoothing ε of pref targets, in (0, 0.5); the authors' code uses sigmoid(-10) ≈ 4.5e-5."""
    temperature: float = 1.0
    """Divide policy and reference logits by this before log-probs (the sampling temperature, e.g. 0.8)."""
    params: dict[str, Any] = field(default_factory=dict)
    """The loss's own hyper-parameters (its keyword-only parameters), e.g. {label_smoothing: 0.1} for cdpo,
    {gamma: 0.5} for simpo, {alpha: 1.0} for rpo, {clip: 0.2} for ppo; unset ones keep the function's defaults."""
    clip: float | None = None
    """PPO's clip range c (ratio clipped to [1-c, 1+c]); loss.clip=0.3 is loss.params={clip: 0.3}. Unset: 0.2."""

    def __post_init__(self) -> None:
        info = resolve_loss(self.name)  # imports and registers file.py:function / module:function
        if self.clip is not None:
            require("clip" in info.hyper_params, "clip", f"loss {self.name!r} has no clip range",
                    "set loss.clip only with loss.name=ppo")
            require(self.params.get("clip", self.clip) == self.clip, "clip",
                    f"given twice: loss.clip={self.clip} and loss.params.clip={self.params.get('clip')}", "give one")
            self.params = {**self.params, "clip": self.clip}
        for name in ("beta_pi", "beta_r", "temperature"):
            value = getattr(self, name)
            require(math.isfinite(value) and value > 0, name, f"must be > 0 (got {value})", "use a positive number such as 0.1")
        try:
            check_eps(self.eps)
        except ConfigError as e:
            raise ConfigError(e.message, field="eps", fix=e.fix) from None
        try:
            self.params = check_params(info, self.params)
        except ConfigError as e:  # the field is dotted from the root; this section's builder prefixes "loss."
            raise ConfigError(e.message, field=(e.field or "params").removeprefix("loss."), fix=e.fix) from None

    @classmethod
    def unknown_key_hint(cls, key: str) -> str | None:
        """A loss's own parameter written as a key of this section (``loss.gamma``): it belongs in ``loss.params``."""
        owners = [info.name for info in LOSSES.values() if key in info.hyper_params]
        if owners:
            return f"{', '.join(owners)}'s {key} is a loss parameter: write loss.params={{{key}: ...}}"
        return None


def default_cache_dir() -> str:
    """Where reference log-probs are cached: ``$EXOALIGN_CACHE`` or ``~/.cache/exoalign``, plus ``/ref_logps``."""
    root = os.environ.get("EXOALIGN_CACHE") or str(Path.home() / ".cache" / "exoalign")
    return str(Path(root) / "ref_logps")


@dataclass
class TrainArgs:
    """Optimisation, logging and checkpointing: the shared loop's settings (section ``train``)."""

    output_dir: str = "runs/exoalign"
    """Directory for checkpoint-{step}/, final/, metrics.jsonl and config.yaml."""
    lr: float = 1e-6
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW (decoupled) weight decay; biases and norm weights are exempt unless weight_decay_exclude_norm_bias=false."""
    weight_decay_exclude_norm_bias: bool = True
    """Exempt biases and normalisation weights (LayerNorm, RMSNorm, ...) from weight decay, as HF Trainer and TRL do."""
    adam_beta1: float = 0.9
    """AdamW β1 (decay rate of the gradient's running mean)."""
    adam_beta2: float = 0.999
    """AdamW β2 (decay rate of the squared gradient's running mean); the EXO paper's code uses 0.95."""
    adam_eps: float = 1e-8
    """AdamW ε added to the denominator."""
    batch_size: int = 8
    """Groups (prompts) per device per micro-batch; the global batch is batch_size × grad_accum × processes."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    max_steps: int | None = None
    """Optimizer steps to run; null = epochs × steps per epoch."""
    epochs: float = 1.0
    """Passes over the training data (used when max_steps is null)."""
    warmup_steps: int = 0
    """Linear warm-up steps of the learning rate."""
    scheduler: str = "linear"
    """LR schedule after warm-up (transformers.get_scheduler): linear, cosine, constant_with_warmup, …"""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this; 0 = no clipping (the norm is still logged)."""
    seed: int = 0
    """Seed for initialisation, data order and everything random; CPU runs are deterministic for a seed."""
    mixed_precision: Literal["no", "bf16"] = "no"
    """no = fp32 compute; bf16 = autocast to bfloat16 (fast on bf16 units: AVX-512 / AMX CPUs, GPUs; an AVX2-only CPU multiplies bf16 several times slower than fp32, and the run warns once)."""
    cpu: bool = False
    """Train on the CPU even when a GPU is present."""
    save_every: int = 0
    """Save a resumable checkpoint (weights + optimizer state) every this many optimizer steps (0 = none); a
    killed run resumes from the newest one. A finished run keeps only final (see save_final_state)."""
    save_total_limit: int | None = 1
    """Keep the optimizer state of only the newest this many checkpoints (null = all); older checkpoints are
    deleted, or kept as weights only with keep_checkpoint_weights."""
    keep_checkpoint_weights: bool = False
    """Keep every checkpoint's weights (model + tokeniser, no optimizer state) beside final after the run and
    when save_total_limit retires it, e.g. to evaluate intermediate checkpoints; the last step gets one too."""
    save_final: bool = True
    """Write output_dir/final (and, with keep_checkpoint_weights or save_final_state, the last step's checkpoint) when
    the run ends; false: the trained model is only returned (``Trainer.train()``, ``Trainer.run()``), for a caller
    that uses it in memory (the demo evaluates it there). Offline runs only; checkpoints before the last step are
    saved as usual."""
    save_final_state: bool = False
    """Keep the optimizer state of the last step (checkpoint-{last}) after a finished run, so that --resume with
    more steps can continue it; false = a finished run holds no optimizer state."""
    save_only_model: bool = False
    """Checkpoints hold the weights only, no optimizer, scheduler or RNG state (as transformers' TrainingArguments
    of that name): a save costs a quarter of a resumable one (SmolLM2 in a demo run: ~1.2 s instead of ~5.3 s),
    but a killed run cannot resume from them. For a driver that restarts a run from scratch rather than resuming
    it (the demo); with keep_checkpoint_weights to evaluate them. Not with save_final_state."""
    log_every: int = 10
    """Write metrics every this many optimizer steps (and at the last step)."""
    eval_every: int = 0
    """Evaluate on the held-out rows every this many steps (0 = only at the end)."""
    resume: bool = False
    """Continue from the last complete checkpoint in output_dir (same as --resume)."""
    ref_mode: Literal["cached", "online"] = "cached"
    """cached: reference log-probs computed once before training and cached on disk; online: recomputed each step."""
    ref_cache_dir: str | None = None
    """Reference log-prob cache directory; null = $EXOALIGN_CACHE/ref_logps or ~/.cache/exoalign/ref_logps."""
    ref_batch_size: int | None = None
    """Groups per forward pass when computing reference log-probs; null = batch_size."""
    report_to: list[str] = field(default_factory=list)
    """Trackers for accelerate's log_with, e.g. [tensorboard] or [wandb] (logs under output_dir)."""
    project_name: str = "exoalign"
    """Project / run-group name given to the trackers."""
    nan_policy: Literal["stop", "skip"] = "stop"
    """On a NaN/inf loss or gradient: stop with a message, or skip the update and count it."""
    prefix_sharing: bool = False
    """Encode each prompt once for its K completions (shared-prefix attention), in the steps and in the cached
    reference log-probs; off = K full sequences."""
    compile: bool = False
    """torch.compile each decoder layer (inductor; needs a C++ compiler on CPU; one graph for all layers); falls back
    to eager with one warning. SmolLM2 on 2 CPU cores: 25-45 s of compiling per process, then steps 12 % (fp32) to
    27 % (bf16) faster: worth it from a few hundred steps; off by default (short runs do not win it back;
    docs/speed.md)."""
    lean_activations: bool = True
    """Gated-SiLU MLPs and RMSNorms keep fewer tensors for backward and recompute the elementwise rest (same
    numbers; SmolLM2: ~0.75 GB less live memory per 1.5k tokens); only where a probe matches the module's own
    forward, and not under DeepSpeed ZeRO-3 (exoalign/lean.py)."""
    chunked_head: Literal["auto", "on", "off"] = "auto"
    """LM head + log-softmax in chunks of tokens, never holding [tokens, vocab] logits: auto = without gradients
    and for large logits (it costs one more head matmul in backward), on = always, off = never."""

    def __post_init__(self) -> None:
        require(math.isfinite(self.lr) and self.lr > 0, "lr", f"must be > 0 (got {self.lr})", "use e.g. 1e-6")
        require(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "must be >= 0", "use e.g. 0.0")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            require(math.isfinite(value) and 0.0 <= value < 1.0, name, f"must be in [0, 1) (got {value})",
                    "use e.g. 0.9 for adam_beta1 and 0.999 (or the paper's 0.95) for adam_beta2")
        require(math.isfinite(self.adam_eps) and self.adam_eps > 0, "adam_eps", f"must be > 0 (got {self.adam_eps})",
                "use e.g. 1e-8")
        require(self.batch_size >= 1, "batch_size", "must be at least 1", "use e.g. 8")
        require(self.grad_accum >= 1, "grad_accum", "must be at least 1", "use 1 for no accumulation")
        require(self.max_steps is None or self.max_steps >= 1, "max_steps", "must be >= 1", "use null to train by epochs")
        require(self.epochs > 0, "epochs", "must be > 0", "use e.g. 1")
        require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0", "use e.g. 0 or 150")
        require(
            self.scheduler in SCHEDULERS, "scheduler", f"unknown scheduler {self.scheduler!r}", f"use one of {', '.join(SCHEDULERS)}"
        )
        require(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0", "use e.g. 1.0, or 0 for no clipping")
        for name in ("save_every", "eval_every"):
            require(getattr(self, name) >= 0, name, "must be >= 0", "use 0 to do it only at the end")
        require(self.log_every >= 1, "log_every", "must be at least 1", "use e.g. 10")
        require(
            self.save_total_limit is None or self.save_total_limit >= 1,
            "save_total_limit",
            "must be at least 1",
            "use null to keep every checkpoint",
        )
        require(not (self.save_only_model and self.save_final_state), "save_only_model",
                "writes checkpoints without optimizer state, but save_final_state asks to keep the last one's",
                "drop one of the two")
        require(self.ref_batch_size is None or self.ref_batch_size >= 1, "ref_batch_size", "must be >= 1", "use e.g. 16")
        known = {"tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio"}
        for tracker in self.report_to:
            require(tracker in known, "report_to", f"unknown tracker {tracker!r}", f"use some of {', '.join(sorted(known))}")

    @property
    def cache_dir(self) -> Path:
        return Path(self.ref_cache_dir or default_cache_dir())


@dataclass
class OnlineConfig:
    """Online training (section ``online``): rounds of sampling from the current policy, scoring and training.

    With ``rounds >= 1``, ``data.train_file`` holds prompt rows and the run is ``rounds × steps_per_round``
    optimizer steps (``train.max_steps`` and ``train.epochs`` are not used); checkpoints fall every
    ``train.save_every`` steps as offline, and the round files keep a resume exact; see docs/online.md.
    """

    rounds: int = 0
    """Rounds of sample → score → train; 0 = offline training on data.train_file's scored rows (the default)."""
    k: int = 4
    """Completions sampled per prompt in each round (K >= 2)."""
    prompts_per_round: int = 8
    """Prompts sampled in each round, taken in turn from a seeded shuffle of data.train_file's prompts."""
    steps_per_round: int = 1
    """Optimizer steps on each round's groups; each group is used steps_per_round × train.batch_size ×
    train.grad_accum / prompts_per_round times (1 = every sample once, as RLOO assumes; more reuses them)."""
    max_new_tokens: int = 32
    """Most tokens sampled per completion; data.max_prompt_length + max_new_tokens must fit in data.max_length."""
    temperature: float = 1.0
    """Sampling temperature; the sampler's log-probs are taken at exactly this temperature."""
    top_k: int = 0
    """Must stay 0: a top-k sampler's log-probs are not the policy's, and no correction is implemented."""
    top_p: float = 1.0
    """Must stay 1.0: nucleus sampling changes the distribution sampled, and no correction is implemented."""
    oracle: str | None = None
    """Reward function module:function or file.py:function, called fn(prompts, completions) -> rewards."""
    reward_model: str | None = None
    """Reward model directory (sequence classifier, as exoalign score's reward_model)."""
    generation_batch_size: int = 16
    """Prompts per generate call (each expands to k rows); does not change the samples."""
    backend: Literal["auto", "hf", "vllm"] = "auto"
    """Sampler of the rounds: hf (transformers generate), vllm (colocated engine, the policy's weights pushed in
    at each round start; needs vllm and a GPU), auto = vllm when installed and on CUDA, else hf."""
    gpu_memory_utilization: float = 0.3
    """vLLM only: fraction of the GPU's memory its engine may take (the policy, π_sft and Adam share the rest)."""
    eval_every: int = 0
    """With held-out prompts (data.eval_file or data.eval_fraction): evaluate reward and KL(π‖π_sft) every this
    many rounds into output_dir/eval.jsonl (0 = only before the first round and at the end). Offline runs use
    train.eval_every; both need online.oracle or online.reward_model as the judge."""
    eval_samples: int = 2
    """Completions sampled per held-out prompt at each held-out evaluation."""
    sample_dtype: Literal["model", "float32", "bfloat16", "float16"] = "model"
    """HF sampler only: the weights the rounds sample from. model = the policy as trained; bfloat16 = a bf16 copy
    of its current weights made at each round (about twice as fast on CPUs with bf16 units). μ, the distribution
    the importance correction divides by, is then the copy's, and the sampler reports its log-probs; training
    keeps the policy's own dtype."""

    def __post_init__(self) -> None:
        require(self.rounds >= 0, "rounds", f"must be >= 0 (got {self.rounds})", "use 0 (offline) or a number of rounds")
        require(self.k >= 2, "k", f"K must be at least 2 (got {self.k})", "use k=4 or more completions per prompt")
        require(self.prompts_per_round >= 1, "prompts_per_round", "must be >= 1", "use e.g. 8")
        require(self.steps_per_round >= 1, "steps_per_round", "must be >= 1", "use 1 (one step per sample) or more")
        require(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1", "use e.g. 32")
        require(math.isfinite(self.temperature) and self.temperature > 0, "temperature",
                f"must be > 0 (got {self.temperature})", "use e.g. 1.0 or 0.8")
        require(self.top_k == 0, "top_k", f"top-k sampling ({self.top_k}) is not corrected for in the sampler's "
                "log-probs", "use top_k=0 (sample the policy's full distribution)")
        require(self.top_p == 1.0, "top_p", f"nucleus sampling ({self.top_p}) is not corrected for in the sampler's "
                "log-probs", "use top_p=1.0 (sample the policy's full distribution)")
        require(self.generation_batch_size >= 1, "generation_batch_size", "must be >= 1", "use e.g. 16")
        require(0 < self.gpu_memory_utilization < 1, "gpu_memory_utilization", "must be in (0, 1)", "use e.g. 0.3")
        require(self.eval_every >= 0, "eval_every", "must be >= 0", "use 0 (only at the start and the end) or N rounds")
        require(self.eval_samples >= 1, "eval_samples", "must be >= 1", "use e.g. 2")
        if self.rounds > 0 and bool(self.oracle) == bool(self.reward_model):
            both = bool(self.oracle)
            require(False, "reward_model" if both else "oracle",
                    "online training needs exactly one of oracle and reward_model" + (" (both are set)" if both else ""),
                    "set online.oracle=module:function (or file.py:function), or online.reward_model=DIR")


@dataclass
class TrainConfig:
    """``exoalign train``: align a causal LM with a loss from the registry on pairs or scored groups."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy (and reference) model."""
    data: DataConfig = field(default_factory=DataConfig)
    """Preference data."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Loss and its hyper-parameters."""
    train: TrainArgs = field(default_factory=TrainArgs)
    """Optimisation, logging, checkpoints."""
    online: OnlineConfig = field(default_factory=OnlineConfig)
    """Online training: sample from the current policy each round (rounds=0, the default, is offline)."""

    def __post_init__(self) -> None:
        if self.online.rounds > 0:
            require(self.train.save_final, "train.save_final", "an online run always writes output_dir/final",
                    "drop train.save_final=false (it is for offline runs)")
            check_online(self)
            return
        require(self.train.save_final or not self.train.save_final_state, "train.save_final_state",
                "keeps the last step's optimizer state on disk, but train.save_final=false writes nothing at the end",
                "drop one of the two")
        require(not resolve_loss(self.loss.name).online_only, "loss.name",
                f"loss {self.loss.name!r} trains on samples of the current policy only",
                "set online.rounds >= 1 (with online.oracle or online.reward_model), or use exo/dpo offline")
        # Preference targets are a distribution over exactly (chosen, rejected).
        require(
            self.loss.target != "pref" or self.data.k in (None, 2),
            "data.k",
            f"loss.target=pref needs K=2 (chosen, rejected), got data.k={self.data.k}",
            "set data.k=2 (best vs worst by reward) or use loss.target=rw for K>2",
        )


def check_runnable(cfg: Any) -> None:
    """Checks that only make sense for a run, not for the defaults ``--help`` prints: required paths are set."""
    require(
        cfg.model.init == "scratch" or bool(cfg.model.name_or_path),
        "model.name_or_path",
        "no model given",
        "set model.name_or_path to a hub name or directory, or model.init=scratch",
    )
    require(bool(cfg.data.train_file), "data.train_file", "no training data given", "set data.train_file to a JSONL file")
    # Model directories are checked before any data is read or anything is written: a missing directory or
    # pickled-only weights would otherwise surface after minutes of work.
    if cfg.model.init != "scratch":
        check_model_dir(cfg.model.name_or_path, "model.name_or_path")
    if getattr(cfg.model, "ref_name_or_path", None):
        check_model_dir(cfg.model.ref_name_or_path, "model.ref_name_or_path")


def check_online(cfg: TrainConfig) -> None:
    """Cross-section checks of an online run (``online.rounds >= 1``)."""
    on, d = cfg.online, cfg.data
    room = d.max_length - on.max_new_tokens
    if getattr(d, "prompt_length_auto", False) and d.max_prompt_length > room >= 1:
        d.max_prompt_length = room  # the default prompt length gives way to the sampled tokens
    online = [name for name, info in LOSSES.items() if info.online]
    require(resolve_loss(cfg.loss.name).online, "loss.name", f"loss {cfg.loss.name!r} has no online form",
            f"use one of {', '.join(online)} (listwise losses) with online.rounds >= 1")
    # ppo's ratio π_θ/π_t compares the loss's log-probs with the sampler's: one distribution, one temperature
    require("sampler_logps" not in resolve_loss(cfg.loss.name).params or cfg.loss.temperature == on.temperature,
            "loss.temperature", f"{cfg.loss.name}'s ratio needs the loss temperature ({cfg.loss.temperature}) to "
            f"equal the sampling temperature ({on.temperature})", f"set loss.temperature={on.temperature}")
    need = d.max_prompt_length + on.max_new_tokens
    require(need <= d.max_length, "online.max_new_tokens",
            f"data.max_prompt_length ({d.max_prompt_length}) + online.max_new_tokens ({on.max_new_tokens}) = {need} "
            f"exceeds data.max_length ({d.max_length}), so sampled completions would be cut",
            f"set data.max_length >= {need} or lower online.max_new_tokens")
    require(d.k is None, "data.k", "data.k selects completions of offline rows; online groups have online.k",
            "remove data.k and set online.k")


def check_round_slots(cfg: TrainConfig, num_processes: int) -> None:
    """Every sampled group of a round is trained on: steps × batch × accumulation × processes ≥ prompts."""
    on = cfg.online
    slots = on.steps_per_round * cfg.train.batch_size * cfg.train.grad_accum * num_processes
    procs = f" × {num_processes} processes" if num_processes > 1 else ""
    require(slots >= on.prompts_per_round, "online.prompts_per_round",
            f"{on.prompts_per_round} groups per round but steps_per_round × batch_size × grad_accum{procs} = {slots}, "
            "so some sampled groups would never be trained on",
            f"set online.prompts_per_round <= {slots}, or raise online.steps_per_round or train.batch_size")
