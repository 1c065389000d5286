"""Preference data: formats, validated loading, JSONL writing, k-selection, tokenisation and collation.

See ``docs/data.md``. The pieces, in the order data flows through them::

    load_rows(source, kind)         → validated, normalised rows (formats.py, io.py, chat.py; published schemas
                                      through columns=/preset=: columns.py, presets.py)
    select_k(rows, k, how)          → at most k completions per group (select.py)
    tokenize_rows(rows, tokenizer)  → TokenizedData: ids, truncation stats, fingerprint (tokenize.py)
    encode_prompts(tokenizer, ps)   → prompt ids: the one encoder of training, sampling, eval (encode.py)
    GroupCollator(pad_id)(features) → padded [B*K, T] batch + [B, K] group tensors (collate.py)
    write_rows / append_rows / read_done_count → stage outputs, atomic and resumable (io.py)
"""

from .collate import GroupCollator
from .columns import parse_columns
from .encode import encode_prompts
from .formats import KINDS, load_rows
from .io import append_rows, iter_source, read_done_count, read_source, truncate_torn, write_rows
from .presets import PRESETS, get_preset
from .select import PER_COMPLETION, reorder, select_k
from .tokenize import TokenizedData, tokenize_rows, tokenizer_hash

__all__ = [
    "KINDS",
    "PER_COMPLETION",
    "PRESETS",
    "GroupCollator",
    "TokenizedData",
    "append_rows",
    "encode_prompts",
    "get_preset",
    "iter_source",
    "load_rows",
    "read_done_count",
    "parse_columns",
    "read_source",
    "reorder",
    "select_k",
    "tokenize_rows",
    "tokenizer_hash",
    "truncate_torn",
    "write_rows",
]
