"""Loading models and tokenisers (hub names or local directories), and building tiny ones from a config.

Loading is safe by default: weights only from safetensors files, ``trust_remote_code`` off unless asked for.
Tiny models and byte-level BPE tokenisers are built on the spot for tests, the smoke config and the demo.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from .errors import InputError
from .hub import hub_reachable
from .zoo import check_available, is_zoo_name, resolve_model_path

EOS = "<|endoftext|>"
PAD = "<|pad|>"

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "auto": "auto"}


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int = 512, model_max_length: int = 1024, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokeniser (GPT-2 style) on ``texts``; EOS = ``<|endoftext|>``, PAD = ``<|pad|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD, unk_token=None,
        model_max_length=model_max_length,
    )


def tiny_config(vocab_size: int, *, model_type: str = "gpt2", **overrides: Any):
    """A small causal-LM config of ``model_type`` (GPT-2 by default: 2 layers, width 64)."""
    defaults: dict[str, Any] = {}
    if model_type == "gpt2":
        defaults = dict(n_layer=2, n_head=2, n_embd=64, n_positions=256, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    defaults.update(overrides)
    return AutoConfig.for_model(model_type, vocab_size=vocab_size, **defaults)


def fuse_activations(model: torch.nn.Module) -> int:
    """Swap transformers' multi-op tanh-GELU modules (GPT-2's ``gelu_new``) for the one-kernel ``GELUTanh``.

    Both compute ``0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))`` (they differ by < 3e-7); the fused kernel keeps
    one activation for backward instead of four, which cuts a GPT-2 training step's peak memory by ~30% and its
    activation time ~3× on CPU. Returns the number of modules swapped.
    """
    from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation

    swapped = 0
    for module in model.modules():
        for name, child in module.named_children():
            if type(child) in (NewGELUActivation, FastGELUActivation):
                setattr(module, name, GELUTanh())
                swapped += 1
    return swapped


def rebuild_causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """A new model of ``model``'s class and config holding its weights, built by ``from_pretrained`` from the state
    dict as :func:`load_causal_lm` builds one from a saved directory (the same dtype; the tensors are shared, not
    copied). What was patched into ``model``'s modules or wrapped around its forward while it trained (lean
    activations, autocast wrappers) is not carried over: the new model computes what the saved one would."""
    dtype = next(model.parameters()).dtype
    fresh = type(model).from_pretrained(None, config=model.config, state_dict=model.state_dict(), dtype=dtype)
    fuse_activations(fresh)
    return fresh


def build_model(config, seed: int = 0, tokenizer: PreTrainedTokenizerFast | None = None) -> torch.nn.Module:
    """A randomly initialised ``AutoModelForCausalLM`` from ``config`` (deterministic for a seed)."""
    if tokenizer is not None:
        config.eos_token_id = tokenizer.eos_token_id
        config.bos_token_id = tokenizer.bos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    fuse_activations(model)
    return model


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False, padding_side: str = "right",
                   field: str = "model.tokenizer"):
    """``AutoTokenizer.from_pretrained`` with a pad token guaranteed (EOS if the tokeniser has none); errors
    name ``field``, the key the user set."""
    name_or_path = resolve_model_path(name_or_path)  # a zoo name (smollm2) → its converted directory
    if looks_local(name_or_path) and not Path(name_or_path).expanduser().is_dir():
        raise InputError("no such tokeniser directory", file=name_or_path, field=field,
                         fix="give a directory with tokenizer files (a model directory has them) or a hub name")
    check_hub(name_or_path, field)
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code,
                                            **hub_kwargs(name_or_path))
    except OSError as e:
        raise InputError(
            f"cannot load a tokeniser ({str(e).splitlines()[0]})", file=str(name_or_path),
            field=field,
            fix="give a local directory with tokenizer files or a hub name (and network access)",
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def looks_local(name_or_path: str) -> bool:
    """True when ``name_or_path`` names a local path (it exists, or is written as one) rather than a hub repo."""
    return Path(name_or_path).exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1


def in_hub_cache(name: str) -> bool:
    """Whether hub repo ``name`` has a snapshot in the local Hugging Face cache."""
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(name, local_files_only=True)
        return True
    except Exception:
        return False


def hub_kwargs(name_or_path: str) -> dict[str, Any]:
    """Extra ``from_pretrained`` arguments for ``name_or_path``: ``local_files_only`` when it is a hub name and
    the hub cannot be reached, so a cached model loads at once instead of after a minute of retries."""
    if looks_local(name_or_path) or is_zoo_name(name_or_path) or hub_reachable():
        return {}
    return {"local_files_only": True}


def check_hub(name_or_path: str, field: str) -> None:
    """Refuse at once a hub name that can be neither downloaded (no network, or ``HF_HUB_OFFLINE``) nor found
    in the local cache, naming ``field`` and the offline alternatives."""
    if looks_local(name_or_path) or is_zoo_name(name_or_path) or hub_reachable() or in_hub_cache(name_or_path):
        return
    from huggingface_hub import constants

    why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"{constants.ENDPOINT} cannot be reached"
    scratch = ", or model.init=scratch (a tiny model built on the spot)" if field.startswith("model.") else ""
    raise InputError(
        f"cannot download hub model {name_or_path!r}: {why} and it is not in the local cache", file=name_or_path,
        field=field, fix=f"use {field}=smollm2 (SmolLM2-135M-Instruct, installed offline), a local model "
                         f"directory{scratch}; or connect to the hub",
    )


def check_model_dir(name_or_path: str, field: str) -> None:
    """Refuse, before any work, a local model that cannot be loaded safely: a missing directory, one without
    ``config.json``, or one whose weights are not safetensors (pickled ``*.bin`` weights are never loaded,
    since unpickling can run code). Hub names pass: they are checked when loaded (with ``use_safetensors``)."""
    if is_zoo_name(name_or_path):  # converted when loaded; here only checked to be installable
        check_available(name_or_path, field)
        return
    if not looks_local(name_or_path):
        check_hub(name_or_path, field)
        return
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise InputError("no such model directory", file=name_or_path, field=field,
                         fix="give a model directory saved with save_pretrained, or a hub name")
    if not (path / "config.json").is_file():
        raise InputError("not a model directory (no config.json)", file=name_or_path, field=field,
                         fix="give the directory that save_pretrained wrote")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.safetensors.index.json")):
        pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
        found = f" (found only {', '.join(pickled[:3])}: pickled weights are never loaded)" if pickled else ""
        raise InputError(
            f"no safetensors weights{found}", file=name_or_path, field=field,
            fix="re-save the model with save_pretrained(dir, safe_serialization=True) from code you trust",
        )


def load_causal_lm(
    name_or_path: str, *, dtype: str = "float32", trust_remote_code: bool = False, field: str = "model.name_or_path",
    **kwargs: Any,
) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` from safetensors only, remote code off unless asked for."""
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}", field="model.dtype", fix=f"use one of {', '.join(DTYPES)}")
    name_or_path = resolve_model_path(str(name_or_path))  # a zoo name (smollm2) → its converted directory
    check_model_dir(name_or_path, field)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, use_safetensors=True,
            **{**hub_kwargs(name_or_path), **kwargs},
        )
        fuse_activations(model)
        from .gemm import apply_fast_linear

        apply_fast_linear(model)  # fp32 CPU products through oneDNN where it is faster (exoalign/gemm.py)
        return model
    except OSError as e:
        raise InputError(
            f"cannot load a model ({str(e).splitlines()[0]})", file=str(name_or_path), field=field,
            fix="give a local model directory or a hub name (and network access)",
        ) from None


def _file_mappings() -> list[tuple[int, int]]:
    """Address ranges ``[start, end)`` of this process's mappings of files (Linux ``/proc/self/maps``; empty
    elsewhere). Anonymous memory (the heap, torch's allocations) has no path."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.readlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/"):
            start, end = parts[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return ranges


def file_backed(tensor: torch.Tensor, ranges: list[tuple[int, int]] | None = None) -> bool:
    """Whether ``tensor``'s memory (CPU) is a mapping of a file: safetensors weights loaded by ``from_pretrained``
    in their stored dtype are views of the memory-mapped file."""
    if tensor.device.type != "cpu" or tensor.numel() == 0:
        return False
    ptr = tensor.data_ptr()
    return any(lo <= ptr < hi for lo, hi in (_file_mappings() if ranges is None else ranges))


def own_trainable_weights(model: torch.nn.Module) -> int:
    """Give each trainable parameter whose memory maps its weight file a copy of its own; returns how many.

    Such a mapping is private (copy-on-write): the first optimizer step then copies every 4 KiB page as it writes
    it, one page fault each (~0.35 s for SmolLM2's 0.54 GB on one core, against ~0.16 s for one copy into memory the
    process already holds). Frozen weights (LoRA's base, a reference) stay mapped: they are only read."""
    ranges = _file_mappings()
    if not ranges:
        return 0
    n = 0
    with torch.no_grad():
        for p in model.parameters():  # each once, tied ones included
            if p.requires_grad and file_backed(p, ranges):
                p.data = p.data.clone()
                n += 1
    return n
