"""Getting ready to train: the accelerator, and the model + tokeniser (loaded, or built from scratch).

Shared by ``exoalign train``, ``exoalign sft`` and ``exoalign rm train``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed

from ..errors import InputError
from ..models import DTYPES, check_model_dir, load_causal_lm, load_tokenizer, tiny_config, train_bpe_tokenizer
from .checkpoint import COMPLETE, save_pretrained_atomic
from .config import ModelConfig, TrainArgs

logger = logging.getLogger(__name__)

Head = Literal["causal", "reward"]


def make_accelerator(args: TrainArgs) -> Accelerator:
    """An ``Accelerator`` for ``args``; on the CPU when asked or when no GPU is present. Seeds everything.

    ``accelerate launch`` / ``torchrun`` supply the process group (DDP, FSDP, DeepSpeed) through the
    environment, so the same call serves one process or many.
    """
    # Accelerator state is a process-wide singleton; a second run in one process (tests, notebooks) may use
    # other settings. The process group itself (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    use_cpu = args.cpu or not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=use_cpu,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.grad_accum,
        log_with=list(args.report_to) or None,
        project_dir=args.output_dir,
        # The scheduler is stepped by the loop once per optimizer step (accelerate would step it once per
        # process, which assumes a schedule stretched by the number of processes).
        step_scheduler_with_optimizer=False,
    )
    set_seed(args.seed)
    return accelerator


def build_scratch(
    cfg: ModelConfig, texts: Sequence[str], *, max_length: int, seed: int, out_dir: Path, head: Head = "causal"
) -> Path:
    """Train a BPE tokeniser on ``texts``, build a random model of ``cfg.model_type``, save both to ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    tokenizer = train_bpe_tokenizer(texts, vocab_size=cfg.vocab_size, model_max_length=max_length)
    overrides = dict(cfg.scratch_config)
    length_key = "n_positions" if cfg.model_type == "gpt2" else "max_position_embeddings"
    overrides.setdefault(length_key, max(max_length, 64))
    ids = {"eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    try:
        config = tiny_config(len(tokenizer), model_type=cfg.model_type, **ids, **overrides)
    except Exception as e:  # unknown model_type, a key of the wrong type (transformers' strict configs), …
        raise InputError(
            f"cannot build a {cfg.model_type!r} model ({' '.join(str(e).split())[:300]})", field="model.scratch_config",
            fix="check model_type and its keys",
        ) from None
    torch.manual_seed(seed)
    if head == "reward":
        config.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    return save_pretrained_atomic(model, tokenizer, out_dir)


def disable_dropout(model: torch.nn.Module) -> None:
    """Zero every dropout probability: policy and reference log-probs must be deterministic functions."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def model_source(cfg: ModelConfig, output_dir: Path) -> Path | str:
    """Where the starting weights come from: ``output_dir/init`` for a scratch model, else name_or_path."""
    return output_dir / "init" if cfg.init == "scratch" else cfg.name_or_path


def prepare_source(
    accelerator: Accelerator,
    cfg: ModelConfig,
    *,
    output_dir: Path,
    texts: Sequence[str],
    max_length: int,
    seed: int,
    resume: bool,
    head: Head = "causal",
) -> str:
    """The path or name to load the starting model from; builds the scratch model (main process) if needed.

    A resumed run reuses the ``init`` it built before, so its reference model is the same.
    """
    source = model_source(cfg, output_dir)
    if cfg.init == "scratch":
        init = Path(source)
        if accelerator.is_main_process and not (resume and (init / COMPLETE).is_file()):
            build_scratch(cfg, texts, max_length=max_length, seed=seed, out_dir=init, head=head)
        accelerator.wait_for_everyone()
    return str(source)


def load_model(cfg: ModelConfig, source: str, *, head: Head = "causal") -> torch.nn.Module:
    """Load the model at ``source`` (safetensors only), with dropout off, LoRA and checkpointing as configured."""
    if head == "reward":
        model = load_reward_model(source, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    else:
        model = load_causal_lm(source, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    if cfg.disable_dropout:
        disable_dropout(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if cfg.lora_r > 0:
        model = apply_lora(model, cfg, head)
    return model


def load_reward_model(source: str, *, dtype: str = "float32", trust_remote_code: bool = False) -> torch.nn.Module:
    """``AutoModelForSequenceClassification`` with one output (a fresh score head on a causal-LM checkpoint)."""
    from transformers import AutoModelForSequenceClassification

    check_model_dir(str(source), "model.name_or_path")
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=1, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, use_safetensors=True
        )
    except OSError as e:
        raise InputError(
            f"cannot load a model ({str(e).splitlines()[0]})", file=str(source),
            field="model.name_or_path",
            fix="give a local model directory or a hub name (and network access)",
        ) from None
    return model


def load_tok(cfg: ModelConfig, source: str) -> Any:
    """The tokeniser (model.tokenizer, else the model's own); its pad token is guaranteed."""
    name = cfg.tokenizer if cfg.tokenizer and cfg.init != "scratch" else source
    return load_tokenizer(name, trust_remote_code=cfg.trust_remote_code)


def apply_lora(model: torch.nn.Module, cfg: ModelConfig, head: Head = "causal") -> torch.nn.Module:
    """Wrap ``model`` with LoRA adapters (peft); only the adapters (and a reward head) are trained."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise InputError("model.lora_r > 0 needs peft", field="model.lora_r", fix="pip install peft, or set lora_r=0") from None
    from transformers.pytorch_utils import Conv1D

    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_target_modules) or "all-linear",
        task_type="SEQ_CLS" if head == "reward" else "CAUSAL_LM",
        # GPT-2 style Conv1D layers store their weight transposed (in × out).
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()),
    )
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()
    try:
        return get_peft_model(model, lora)
    except ValueError as e:  # e.g. target modules that the model does not have
        raise InputError(f"cannot add LoRA adapters ({str(e).splitlines()[0]})", field="model.lora_target_modules",
                         fix="name modules the model has (e.g. c_attn for GPT-2), or leave it empty for all linear layers") from None


def finalize(model: torch.nn.Module) -> torch.nn.Module:
    """The model to save as ``final``: LoRA adapters merged into the weights, so plain ``from_pretrained`` loads it."""
    if hasattr(model, "merge_and_unload") and hasattr(model, "peft_config"):
        return model.merge_and_unload()
    return model
