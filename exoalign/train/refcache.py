"""Reference log-probs ``log π_sft(y_i | x)``: computed in one pass before training and cached on disk.

The reference model never changes during training, so its log-probs on the training completions are a
fixed table ``[N, K_max]`` (row = dataset row, column = completion slot). Computing it once halves the
forward passes of every step and frees the reference's memory. The table is stored as safetensors under
``train.ref_cache_dir`` in a file named by a hash of everything that determines it:

* the data fingerprint (token ids of prompts and completions, and the tokeniser; see ``tokenize_rows``),
* the reference model identity: the resolved directory and a hash of its weight files (or, for a model
  trained from scratch in this run, its saved ``init`` directory),
* the tokeniser hash, ``max_length``, ``max_prompt_length``, the logit temperature, the weights dtype and
  the autocast precision (bf16 changes the numbers).

A second run with the same inputs loads the file instead of recomputing (and logs that it did).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ..data import GroupCollator, TokenizedData, tokenizer_hash
from ..fileio import atomic_write
from ..zoo import resolve_model_path
from .step import grouped_logps, is_peft, unwrap

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
#: Weight files up to this total size are hashed in full; larger ones by size + evenly spaced samples.
FULL_HASH_BYTES = 4 << 30
_SAMPLES, _SAMPLE_BYTES = 256, 1 << 20


def _hash_file(path: Path, digest: Any) -> None:
    size = path.stat().st_size
    digest.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
            return
        # Very large checkpoints: the safetensors header (names, shapes, offsets) plus evenly spaced samples of
        # the tensor bytes; two different fine-tunes of one model differ in essentially every sample.
        for i in range(_SAMPLES):
            f.seek(i * (size - _SAMPLE_BYTES) // (_SAMPLES - 1))
            digest.update(f.read(_SAMPLE_BYTES))


def model_identity(name_or_path: str) -> str:
    """A hash of the model's weight files (a local directory, a zoo name's converted one, or a hub snapshot)."""
    path = Path(os.path.expanduser(resolve_model_path(str(name_or_path))))
    if not path.is_dir():
        try:  # a hub name: the cached snapshot directory (named by commit) holds the files
            from transformers.utils import cached_file

            path = Path(cached_file(name_or_path, "config.json")).parent
        except Exception:  # noqa: BLE001 - no local snapshot: fall back to the name alone
            return hashlib.sha256(f"name:{name_or_path}".encode()).hexdigest()[:16]
    files = sorted(path.glob("*.safetensors")) + sorted(path.glob("config.json"))
    # Hashing SmolLM2's 0.54 GB takes ~0.4 s; a process that starts several runs of one reference (the demo's
    # workers) hashes it once, for as long as no file changed (path, inode, size, modification and change times).
    # Files modified in the last few seconds are hashed every time: a rewrite within the clock's granularity
    # could keep all of those the same.
    stats = [(f, f.stat()) for f in files]
    seen = tuple((str(f), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) for f, st in stats)
    settled = all(time.time_ns() - st.st_mtime_ns > 5_000_000_000 for _, st in stats)
    if settled and seen in _IDENTITIES:
        return _IDENTITIES[seen]
    digest = hashlib.sha256()
    for f in files:
        _hash_file(f, digest)
    identity = digest.hexdigest()[:16]
    if settled:
        _IDENTITIES[seen] = identity
    return identity


_IDENTITIES: dict[tuple, str] = {}
""":func:`model_identity` of weight files already hashed by this process, keyed by their paths, sizes and mtimes."""


def cache_key(data: TokenizedData, *, model_id: str, tokenizer: Any, settings: dict[str, Any],
              rows: list[int] | None = None) -> tuple[str, dict]:
    """The cache file's name (a hash) and the human-readable description it hashes. ``rows`` (a subset of the
    data's rows, see :func:`ref_logps_table`) adds how many and a hash of which."""
    desc = {
        "version": CACHE_VERSION,
        "data": data.fingerprint,
        "rows": len(data),
        "model": model_id,
        "tokenizer": tokenizer_hash(tokenizer),
        **settings,
    }
    if rows is not None:
        desc["subset"] = {"n": len(rows), "hash": hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]}
    key = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:24]
    return key, desc


@torch.no_grad()
def compute_table(
    accelerator: Any,
    model: torch.nn.Module,
    data: TokenizedData,
    pad_token_id: int,
    *,
    batch_size: int,
    temperature: float,
    desc: str = "reference log-probs",
    rows: list[int] | None = None,
    prefix_sharing: bool = False,
    progress: Any = None,
) -> torch.Tensor:
    """Reference log-probs ``[N, K_max]`` of every completion of ``data`` (0 in missing slots).

    Each process scores a strided shard of the rows; the shards are summed across processes, so every process
    ends with the full table. ``model`` is used with its LoRA adapters disabled when it has them. With ``rows``
    only those rows are scored; the others are NaN (a step that reads one fails, see ``train.step``).
    ``prefix_sharing`` runs each group's prompt once for its K completions (``exoalign.packing``; falls back to
    the K full sequences for a model that cannot take that layout): about half the tokens at the demo's shape.
    ``progress``: a tqdm bar to advance by one per batch instead of a bar of its own.
    """
    N = len(data)
    k_max = max((len(f["completion_ids"]) for f in data.features), default=0)
    table = torch.zeros(N, k_max, dtype=torch.float32, device=accelerator.device)  # (N, K_max)
    wanted = list(range(N)) if rows is None else rows
    shard = Subset(data, wanted[accelerator.process_index::accelerator.num_processes])
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, collate_fn=GroupCollator(pad_token_id))
    was_training = model.training
    model.eval()
    net = unwrap(model)
    adapters_off = net.disable_adapter() if is_peft(net) else contextlib.nullcontext()
    bar = loader if progress is not None else tqdm(loader, desc=desc, disable=not accelerator.is_local_main_process,
                                                   leave=False)
    with adapters_off, accelerator.autocast():
        for batch in bar:
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            logps, _ = grouped_logps(net, batch, temperature, prefix_sharing)  # (B, K)
            logps = logps.float().masked_fill(~batch["group_mask"], 0.0)
            table[batch["index"], : logps.shape[1]] = logps
            if progress is not None:
                progress.update(1)
    model.train(was_training)
    if accelerator.num_processes > 1:
        table = accelerator.reduce(table, reduction="sum")  # disjoint shards: the sum is the union
    table = table.cpu()
    if rows is not None:  # after the sum: NaN + x would spread
        missing = torch.ones(N, dtype=torch.bool)
        missing[torch.tensor(rows, dtype=torch.long)] = False
        table[missing] = float("nan")
    return table


def load_cached(path: Path, desc: dict) -> torch.Tensor | None:
    """The cached table at ``path`` if it exists and was made for ``desc``; None otherwise."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if json.loads(meta.get("key", "{}")) != json.loads(json.dumps(desc)):
            logger.warning("reference cache %s was made for other inputs; recomputing", path)
            return None
        return load_file(str(path))["logps"]
    except Exception as e:  # noqa: BLE001 - a corrupt cache file is recomputed, never trusted
        logger.warning("reference cache %s is unreadable (%s); recomputing", path, e)
        return None


def save_cached(path: Path, table: torch.Tensor, desc: dict) -> None:
    """Write the table atomically (temp file + rename), with its description as safetensors metadata."""
    atomic_write(path, lambda tmp: save_file({"logps": table.contiguous()}, str(tmp),
                                             metadata={"key": json.dumps(desc, sort_keys=True)}))


def ref_logps_table(
    accelerator: Any,
    data: TokenizedData,
    *,
    cache_dir: Path,
    model_id: str,
    tokenizer: Any,
    settings: dict[str, Any],
    get_model: Any,
    batch_size: int,
    temperature: float,
    desc: str = "reference log-probs",
    rows: list[int] | None = None,
    prefix_sharing: bool = False,
) -> tuple[torch.Tensor, bool]:
    """The ``[N, K_max]`` reference table for ``data``: from the cache when present (True), else computed with
    ``get_model()`` and written to the cache (False). Every process returns the same table.

    ``rows`` (sorted indices; None = all): score only the rows a run will read (``engine.planned_rows``: a run of
    a few steps over a large dataset), the rest NaN; the cache entry is its own (the key names the subset).
    ``prefix_sharing``: each prompt encoded once for its completions (``exoalign.packing``), as the training step
    does with ``train.prefix_sharing``; the table then differs at rounding level, so the key names it."""
    if prefix_sharing:
        settings = {**settings, "prefix_sharing": True}
    key, description = cache_key(data, model_id=model_id, tokenizer=tokenizer, settings=settings, rows=rows)
    path = cache_dir / f"{key}.safetensors"
    if accelerator.num_processes == 1:
        # Runs that share the cache directory (the demo's parallel jobs) compute one table once, together: each
        # scores the pieces nobody else is scoring and reads the others' (:func:`_shared_table`).
        return _shared_table(accelerator, data, path, description, tokenizer, get_model, batch_size, temperature,
                             desc, rows, prefix_sharing)
    # A distributed run: the main process holds a lock on the entry while it looks it up and, on a miss, all
    # processes compute it (strided shards); another run that asks for the same table meanwhile waits, then reads.
    with entry_lock(path, active=accelerator.is_main_process):
        return _lookup_or_compute(accelerator, data, path, description, tokenizer, get_model, batch_size,
                                  temperature, desc, rows, prefix_sharing)


@contextlib.contextmanager
def entry_lock(path: Path, *, active: bool = True, wait: bool = True) -> Any:
    """An exclusive advisory lock on ``path``'s cache entry (``path`` + ``.lock``) for the ``with`` block, across
    processes: True inside. ``wait=False``: False at once when another holder has it. A no-op (True) where
    ``fcntl`` is missing (Windows) or when not ``active``."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        fcntl = None  # type: ignore[assignment]
    if not active or fcntl is None:
        yield True
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


MAX_PIECES = 64
"""At most this many pieces per shared table (:func:`_shared_table`); a piece is a whole number of batches."""


def table_pieces(wanted: list[int], batch_size: int) -> list[list[int]]:
    """``wanted`` cut into consecutive pieces of whole batches (at most :data:`MAX_PIECES`): scored piece by piece,
    every batch holds the rows it holds when the table is scored in one pass, so the numbers are the same."""
    n_batches = -(-len(wanted) // batch_size)
    size = batch_size * -(-n_batches // MAX_PIECES)
    return [wanted[i : i + size] for i in range(0, len(wanted), size)]


def _shared_table(accelerator: Any, data: TokenizedData, path: Path, description: dict, tokenizer: Any,
                  get_model: Any, batch_size: int, temperature: float, desc: str, rows: list[int] | None,
                  prefix_sharing: bool) -> tuple[torch.Tensor, bool]:
    """The table of a single-process run, scored together with any other run that asks for it meanwhile.

    The rows are cut into pieces of whole batches (:func:`table_pieces`), each with a lock and a file under
    ``<entry>.parts/``. A run scores every piece whose lock it gets and whose file is missing, then waits for the
    pieces others hold and reads them: two runs that start together each score about half. The first to have
    every piece writes the entry (atomically, under the entry's lock) and removes the pieces; a run that finds
    the entry written stops there and reads it. A run that dies drops its locks, and the piece it held is scored
    by whoever waits for it. Returns (table, True) when this run scored nothing itself."""
    table = load_cached(path, description)
    if table is not None:
        logger.info("%s: loaded from cache %s", desc, path)
        return table, True
    if path.is_file():  # made for other inputs or unreadable (load_cached said which): scored again, replaced
        with entry_lock(path):
            if load_cached(path, description) is None:
                path.unlink(missing_ok=True)
    N = len(data)
    k_max = max((len(f["completion_ids"]) for f in data.features), default=0)
    wanted = list(range(N)) if rows is None else rows
    pieces = table_pieces(wanted, batch_size)
    parts = path.with_name(path.stem + ".parts")
    model: list[torch.nn.Module] = []
    got: dict[int, torch.Tensor] = {}  # piece -> its rows of the table (L, K_max)
    mine: set[int] = set()  # the pieces this run scored
    bar = tqdm(total=-(-len(wanted) // batch_size), desc=desc, leave=False,
               disable=not accelerator.is_local_main_process)

    def score(i: int) -> None:
        if not model:
            model.append(get_model())
        full = compute_table(accelerator, model[0], data, tokenizer.pad_token_id, batch_size=batch_size,
                             temperature=temperature, rows=pieces[i], prefix_sharing=prefix_sharing, progress=bar)
        got[i] = full[torch.tensor(pieces[i], dtype=torch.long)]  # (L, K_max)
        mine.add(i)
        atomic_write(parts / f"{i}.safetensors", lambda tmp: save_file({"logps": got[i].contiguous()}, str(tmp)))

    def written() -> torch.Tensor | None:  # the entry, once another run has written it (then no piece is needed)
        if not path.is_file():
            return None
        table = load_file(str(path))["logps"]
        with entry_lock(path):
            shutil.rmtree(parts, ignore_errors=True)
        logger.info("%s: scored together with another run (%d of %d pieces here), read from %s", desc, len(mine),
                    len(pieces), path)
        return table

    try:
        for i in range(len(pieces)):  # every piece nobody holds
            with entry_lock(parts / str(i), wait=False) as free:  # the piece's lock: parts/<i>.lock
                if (table := written()) is not None:
                    return table, not mine
                if free and not (parts / f"{i}.safetensors").is_file():
                    score(i)
        for i in range(len(pieces)):  # the pieces others held: wait for each, then read it
            if i in got:
                continue
            with entry_lock(parts / str(i)):  # waits for its holder
                if (table := written()) is not None:
                    return table, not mine
                if (parts / f"{i}.safetensors").is_file():
                    got[i] = load_file(str(parts / f"{i}.safetensors"))["logps"]
                    bar.update(-(-len(pieces[i]) // batch_size))
                else:  # its holder stopped before writing it
                    score(i)
    finally:
        bar.close()
    table = torch.full((N, k_max), float("nan") if rows is not None else 0.0)  # (N, K_max)
    for i, piece in enumerate(pieces):
        table[torch.tensor(piece, dtype=torch.long)] = got[i].float().cpu()
    with entry_lock(path):
        if not path.is_file():
            save_cached(path, table, description)
            logger.info("%s: computed and cached in %s (%d of %d pieces here)", desc, path, len(mine), len(pieces))
        shutil.rmtree(parts, ignore_errors=True)
    return table, not mine


def _lookup_or_compute(accelerator: Any, data: TokenizedData, path: Path, description: dict, tokenizer: Any,
                       get_model: Any, batch_size: int, temperature: float, desc: str,
                       rows: list[int] | None = None, prefix_sharing: bool = False) -> tuple[torch.Tensor, bool]:
    from accelerate.utils import broadcast_object_list

    # The main process decides hit/miss for everyone: processes must agree, or the collective reduce hangs.
    table = load_cached(path, description) if accelerator.is_main_process else None
    hit = [table is not None]
    if accelerator.num_processes > 1:
        broadcast_object_list(hit)
    if hit[0]:
        if table is None:
            table = load_file(str(path))["logps"]
        if accelerator.is_main_process:
            logger.info("%s: loaded from cache %s", desc, path)
        return table, True
    table = compute_table(
        accelerator, get_model(), data, tokenizer.pad_token_id, batch_size=batch_size, temperature=temperature, desc=desc,
        rows=rows, prefix_sharing=prefix_sharing,
    )
    if accelerator.is_main_process:
        save_cached(path, table, description)
        logger.info("%s: computed and cached in %s", desc, path)
    accelerator.wait_for_everyone()
    return table, False


def attach(data: TokenizedData, table: torch.Tensor) -> TokenizedData:
    """``data`` whose features carry their row of the table as ``ref_logps`` (one value per completion)."""
    rows = [table[i, : len(f["completion_ids"])].tolist() for i, f in enumerate(data.features)]
    return data.with_ref_logps(rows)
