"""Preference data: formats, validated loading, JSONL writing, k-selection, tokenisation and collation.

See ``docs/data.md``. The pieces, in the order data flows through them::

    load_rows(source, kind)         → validated, normalised rows (formats.py, io.py, chat.py)
    select_k(rows, k, how)          → at most k completions per group (select.py)
    tokenize_rows(rows, tokenizer)  → TokenizedData: ids, truncation stats, fingerprint (tokenize.py)
    GroupCollator(pad_id)(features) → padded [B*K, T] batch + [B, K] group tensors (collate.py)
    write_rows / append_rows / read_done_count → stage outputs, atomic and resumable (io.py)
"""

from .collate import GroupCollator
from .formats import KINDS, load_rows
from .io import append_rows, iter_source, read_done_count, read_source, truncate_torn, write_rows
from .select import PER_COMPLETION, reorder, select_k
from .tokenize import TokenizedData, tokenize_rows, tokenizer_hash

__all__ = [
    "KINDS",
    "PER_COMPLETION",
    "GroupCollator",
    "TokenizedData",
    "append_rows",
    "iter_source",
    "load_rows",
    "read_done_count",
    "read_source",
    "reorder",
    "select_k",
    "tokenize_rows",
    "tokenizer_hash",
    "truncate_torn",
    "write_rows",
]
