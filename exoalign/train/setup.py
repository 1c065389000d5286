"""Getting ready to train: the accelerator, and the model + tokeniser (loaded, or built from scratch).

Shared by ``exoalign train``, ``exoalign sft`` and ``exoalign rm train``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed

from ..errors import InputError
from ..models import (
    DTYPES,
    check_model_dir,
    hub_kwargs,
    load_causal_lm,
    load_tokenizer,
    tiny_config,
    train_bpe_tokenizer,
)
from ..zoo import is_zoo_name, resolve_model_path
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


#: What different architectures call the same size (GPT-2 style vs Llama style names).
_SYNONYMS = (
    ("n_embd", "hidden_size", "d_model"), ("n_layer", "num_hidden_layers", "num_layers"),
    ("n_head", "num_attention_heads"), ("n_positions", "max_position_embeddings"), ("n_inner", "intermediate_size", "ffn_dim"),
)


#: Keyword arguments every config takes without keeping them under the same attribute name.
_CONFIG_KWARGS = {"attn_implementation", "dtype", "torch_dtype", "num_labels", "id2label", "label2id"}


def _scratch_config(cfg: ModelConfig, tokenizer: Any, max_length: int, head: Head) -> Any:
    """The transformers config of a scratch model, or :class:`InputError` naming ``model.model_type`` (unknown, or
    without the head this stage needs) or ``model.scratch_config`` (a key the config class refuses)."""
    import difflib

    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    # By name (model_type → class name), so that no model code is imported to decide.
    usable = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    if head == "reward":
        usable &= set(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)
    if cfg.model_type not in usable:
        what = "unknown model_type" if cfg.model_type not in CONFIG_MAPPING else (
            "transformers has no causal-LM class for it" if cfg.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            else "transformers has no sequence-classification class for it")
        close = difflib.get_close_matches(cfg.model_type, sorted(usable), n=3)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise InputError(
            f"{cfg.model_type!r} is not a model_type with a {'reward' if head == 'reward' else 'causal-LM'} head "
            f"({what})", field="model.model_type",
            fix=f"use a decoder-only model_type such as gpt2, llama, mistral, qwen2{hint}",
        )
    overrides = dict(cfg.scratch_config)
    config_class = CONFIG_MAPPING[cfg.model_type]
    try:
        known = set(vars(config_class())) | set(getattr(config_class, "attribute_map", {})) | _CONFIG_KWARGS
    except Exception:  # a config class without usable defaults: leave the keys to transformers
        known = set(overrides)
    for key in overrides:  # transformers keeps unknown keys silently: n_layer on a llama would build 7B weights
        if key not in known:
            same = [k for group in _SYNONYMS if key in group for k in group if k in known]
            close = same or difflib.get_close_matches(str(key), sorted(k for k in known if not k.startswith("_")), n=1)
            raise InputError(
                f"{key!r} is not a key of the {cfg.model_type!r} config", field="model.scratch_config",
                fix=f"did you mean '{close[0]}'?" if close else f"use the keys of transformers' {cfg.model_type} config",
            )
    length_key = "n_positions" if cfg.model_type == "gpt2" else "max_position_embeddings"
    overrides.setdefault(length_key, max(max_length, 64))
    ids = {"eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    try:
        return tiny_config(len(tokenizer), model_type=cfg.model_type, **ids, **overrides)
    except Exception as e:  # a key of the wrong type or value (transformers' strict configs), …
        raise InputError(
            f"cannot build a {cfg.model_type!r} config ({' '.join(str(e).split())[:300]})",
            field="model.scratch_config", fix=f"check the keys given for {cfg.model_type!r} and their values",
        ) from None


def _check_runs(model: torch.nn.Module, cfg: ModelConfig, max_length: int) -> None:
    """One forward pass at the full data.max_length: a config the architecture rejects only when it runs (gptj's
    rotary_dim above the head size, too few positions, …) fails here, before anything is written."""
    n = max(2, max_length)
    vocab = model.get_input_embeddings().num_embeddings
    ids = (torch.arange(n) % max(vocab - 3, 1) + 3).view(1, n)  # (1, n) ordinary (non-special) ids
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    except Exception as e:
        raise InputError(
            f"a {cfg.model_type!r} model built from this config cannot run "
            f"({type(e).__name__}: {' '.join(str(e).split())[:200]})", field="model.scratch_config",
            fix=f"make the keys consistent (e.g. rotary_dim <= n_embd / n_head, positions >= data.max_length "
                f"{max_length}), or drop them to use the defaults",
        ) from None
    finally:
        model.train(was_training)


def build_scratch(
    cfg: ModelConfig, texts: Sequence[str], *, max_length: int, seed: int, out_dir: Path, head: Head = "causal"
) -> Path:
    """Train a BPE tokeniser on ``texts``, build a random model of ``cfg.model_type``, save both to ``out_dir``.

    The model is checked to run (one forward pass) before anything is saved, so a bad ``model.model_type`` or
    ``model.scratch_config`` is one :class:`InputError` and leaves no ``output_dir/init`` behind.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    tokenizer = train_bpe_tokenizer(texts, vocab_size=cfg.vocab_size, model_max_length=max_length)
    config = _scratch_config(cfg, tokenizer, max_length, head)
    torch.manual_seed(seed)
    try:
        if head == "reward":
            config.num_labels = 1
            model = AutoModelForSequenceClassification.from_config(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # the config was accepted but the model's constructor rejects it
        raise InputError(
            f"cannot build a {cfg.model_type!r} model ({type(e).__name__}: {' '.join(str(e).split())[:200]})",
            field="model.scratch_config", fix=f"check the keys given for {cfg.model_type!r} and their values",
        ) from None
    _check_runs(model, cfg, max_length)
    return save_pretrained_atomic(model, tokenizer, out_dir)


#: Names of config fields and module attributes that hold a dropout-like probability (or noise scale) applied
#: only in training mode: attention_dropout, hidden_dropout, attn_pdrop, resid_pdrop, OPT's dropout and
#: layerdrop, drop_path_rate, MoE router_jitter_noise, …
DROPOUT_NAME = re.compile(r"(dropout|pdrop|layerdrop|drop_rate|drop_prob|drop_path|jitter)", re.IGNORECASE)


def _zero_dropout_attrs(obj: Any) -> int:
    """Set every number-valued attribute of ``obj`` whose name looks like a dropout probability to 0."""
    n = 0
    for name, value in list(vars(obj).items()):
        if DROPOUT_NAME.search(name) and isinstance(value, (int, float)) and not isinstance(value, bool) and value:
            setattr(obj, name, type(value)(0))
            n += 1
    return n


def _zero_config_dropout(config: Any, seen: set[int]) -> int:
    """Zero the dropout fields of a transformers config and of its sub-configs (``text_config``, …)."""
    from transformers import PretrainedConfig

    if id(config) in seen:
        return 0
    seen.add(id(config))
    n = _zero_dropout_attrs(config)
    for value in list(vars(config).values()):
        if isinstance(value, PretrainedConfig):
            n += _zero_config_dropout(value, seen)
    return n


def disable_dropout(model: torch.nn.Module) -> int:
    """Zero every dropout probability, so policy and reference log-probs are deterministic functions of the weights.

    Three places hold one: ``nn.Dropout`` modules; float attributes that modules copied from the config at
    build time and apply functionally (OPT's ``self.dropout``, GPTBigCode's ``attn_pdrop``, the
    ``attention_dropout`` every attention passes to its kernel when training); and the config itself, which
    some models read at forward time. All three are zeroed, names matched by :data:`DROPOUT_NAME`. Returns
    how many values were changed.
    """
    n, seen = 0, set()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            n += module.p != 0
            module.p = 0.0
        else:
            n += _zero_dropout_attrs(module)
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            n += _zero_config_dropout(config, seen)
    return n


def is_norm_module(module: torch.nn.Module) -> bool:
    """LayerNorm, RMSNorm, GroupNorm, BatchNorm and every model's own ``*Norm`` class (LlamaRMSNorm, …)."""
    norms = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm, torch.nn.modules.batchnorm._NormBase)
    return isinstance(module, norms) or "Norm" in type(module).__name__


def no_decay_names(model: torch.nn.Module) -> set[str]:
    """Names of the trainable parameters exempt from weight decay: biases and the weights of norm modules."""
    out = set()
    for module_name, module in model.named_modules():
        norm = is_norm_module(module)
        for name, param in module.named_parameters(recurse=False):
            if param.requires_grad and (norm or "bias" in name):
                out.add(f"{module_name}.{name}" if module_name else name)
    return out


def param_groups(model: torch.nn.Module, weight_decay: float, exclude_norm_bias: bool = True) -> list[dict]:
    """AdamW parameter groups: ``weight_decay`` on the trainable weights, 0 on biases and norm weights (when
    ``exclude_norm_bias``), as the HF Trainer builds them. Tied parameters appear once; empty groups are dropped."""
    skip = no_decay_names(model) if exclude_norm_bias and weight_decay > 0 else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name in skip else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(model: torch.nn.Module, args: TrainArgs) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters with ``train.{lr, adam_beta1, adam_beta2, adam_eps}`` and the
    weight-decay groups of :func:`param_groups`; the fused kernel when every parameter allows it."""
    groups = param_groups(model, args.weight_decay, args.weight_decay_exclude_norm_bias)
    params = [p for g in groups for p in g["params"]]
    # The fused kernel is one pass over the parameters instead of a dozen (~20x faster on CPU); same update.
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps,
                             weight_decay=args.weight_decay, fused=fused or None)


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
    elif is_zoo_name(str(source)):  # smollm2 → its converted directory (converted once, by the main process)
        if accelerator.is_main_process:
            resolve_model_path(str(source))
        accelerator.wait_for_everyone()
        source = resolve_model_path(str(source))
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
            source, num_labels=1, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, use_safetensors=True,
            **hub_kwargs(str(source)),
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
    own = not (cfg.tokenizer and cfg.init != "scratch")
    name = source if own else cfg.tokenizer
    return load_tokenizer(name, trust_remote_code=cfg.trust_remote_code,
                          field="model.name_or_path" if own else "model.tokenizer")


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

