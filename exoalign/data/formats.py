"""Row formats, validation and normalisation: :func:`load_rows`.

Kinds and their rows (plain text; see ``chat.py`` for conversations):

* ``pair``   ``{"prompt", "chosen", "rejected"}`` (optional ``"rewards": [r_chosen, r_rejected]``)
* ``group``  ``{"prompt", "completions": [...] (K ≥ 2), "rewards": [...] (optional, K finite numbers)}``

Pair and group rows written by ``exoalign sample`` also carry, one entry per completion (chosen first in a pair):
``"finished": [bool, ...]`` (did the completion end with EOS, or was it cut at ``max_new_tokens``) and
``"completion_ids": [[int, ...], ...]`` (the sampled token ids, ending in the stop token when finished). Both
are optional; ``tokenize_rows`` appends EOS only to finished completions and scores the stored ids as sampled.
* ``sft``    ``{"prompt", "completion"}``
* ``prompt`` ``{"prompt"}``
* ``preference``: pair or group, decided by the file's first row; every row must then be that kind.

Every row is checked before any row is returned, and the first bad one raises :class:`InputError` naming the
file, the line (row number for JSON arrays, Parquet and ``datasets`` sources), the field and the fix.
Normalised rows: pair/group → ``{"prompt": str, "completions": [str, ...], "rewards": [float, ...] | None}``
(a pair is ``completions=[chosen, rejected]``), plus ``finished`` / ``completion_ids`` when the row has them; sft → ``{"prompt", "completion"}``; prompt → ``{"prompt"}``.
Fields the format does not use are kept as they are.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import InputError
from .chat import check_messages, render_prompt, split_final_assistant
from .columns import apply_columns, parse_columns
from .io import is_finite_number, iter_source, json_type
from .presets import get_preset, suggest

KINDS = ("pair", "group", "sft", "prompt", "preference")
# Fields each kind reads (and so does not copy through as extras).
_USED = {
    "pair": ("prompt", "chosen", "rejected", "rewards", "score_chosen", "score_rejected", "messages", "finished",
             "completion_ids"),
    "group": ("prompt", "completions", "rewards", "messages", "finished", "completion_ids"),
    "sft": ("prompt", "completion", "messages"),
    "prompt": ("prompt", "messages"),
}
_SHAPES = {
    "pair": '{"prompt": ..., "chosen": ..., "rejected": ...}',
    "group": '{"prompt": ..., "completions": [...], "rewards": [...]}',
    "sft": '{"prompt": ..., "completion": ...}',
    "prompt": '{"prompt": ...}',
}


@dataclass
class _Ctx:
    """Where a row came from, and how to say what is wrong with it."""

    file: str
    line: int
    kind: str
    row: dict[str, Any]
    tokenizer: Any

    def error(self, field: str | None, message: str, fix: str) -> InputError:
        return InputError(message, file=self.file, line=self.line, field=field, fix=fix)

    def get(self, field: str) -> Any:
        """The field's value, treating null as absent (Parquet/datasets fill missing fields with None)."""
        return self.row.get(field)

    def missing(self, field: str) -> InputError:
        """A missing field; names the row's closest unknown key when it looks like a misspelling."""
        # Any key this kind does not read may be the misspelling, even one another kind uses ("completion").
        unknown = [k for k in self.row if k not in _USED[self.kind] and isinstance(k, str)]
        close = difflib.get_close_matches(field, unknown, n=1, cutoff=0.6)
        if close:
            return self.error(field, f"missing (found '{close[0]}': a misspelling?)",
                              f"rename '{close[0]}' to '{field}'")
        return self.error(field, "missing", f"a {self.kind} row looks like {_SHAPES[self.kind]}")


def load_rows(
    source: str | os.PathLike | list[dict[str, Any]] | Any,
    kind: str,
    *,
    split: str = "train",
    tokenizer: Any = None,
    require_rewards: bool = False,
    columns: Mapping[str, Any] | str | None = None,
    preset: str | None = None,
    name: str | None = None,
) -> list[dict[str, Any]]:
    """Load, validate and normalise every row of ``source``: a file, a saved dataset, a hub name, or rows in
    memory (a list of dicts, a ``datasets.Dataset`` or ``DatasetDict``).

    ``kind`` is ``pair | group | sft | prompt | preference``; ``tokenizer`` renders conversational rows with
    its chat template; ``require_rewards`` makes a row without rewards an error (reward targets need them).
    ``columns`` maps the source's fields onto ours (``{"prompt": "instruction", "completions":
    "completions[].response"}``, see ``columns.py``) and ``preset`` names a published schema (``presets.py``);
    the column map is applied first. Rows in memory are named ``name[i]`` in errors (``name`` defaults to
    ``rows``). Raises :class:`InputError` for the first bad row; returns nothing partial.
    """
    if kind not in KINDS:
        close = difflib.get_close_matches(str(kind), KINDS, n=1)
        fix = f"did you mean '{close[0]}'?" if close else f"use one of {', '.join(KINDS)}"
        raise InputError(f"unknown row kind {kind!r}", field="kind", fix=fix)
    column_map = parse_columns(columns)
    convert = get_preset(preset).convert if preset else None
    out = []
    # Rows are validated as they are read, so the error is always about the first bad line of the file.
    for raw, file, line in _iter_rows(source, split, name):
        row = apply_columns(raw, column_map, file=file, line=line) if column_map else raw
        if convert is not None:
            row = convert(row, kind, file, line)
        if kind == "preference":
            kind = _detect_preference(row)  # the first row decides for the whole file
        try:
            out.append(normalise_row(_Ctx(file, line, kind, row, tokenizer), require_rewards=require_rewards))
        except InputError as e:
            hint = None if (column_map or convert or "chat template" in e.message) else suggest(raw, kind)
            if hint is None:
                raise
            raise InputError(e.message, file=e.file, line=e.line, field=e.field, fix=hint) from None
    return out


def _iter_rows(source: Any, split: str, name: str | None) -> Iterator[tuple[dict[str, Any], str, int | None]]:
    """``(raw row, file for errors, line or None)`` for every row of ``source``, in order."""
    if isinstance(source, (str, os.PathLike)):
        file, items = iter_source(source, split=split)
        for row, line in items:
            yield row, file, line
        return
    name = name or "rows"
    import datasets

    if isinstance(source, datasets.DatasetDict):
        if split not in source:
            raise InputError(f"no split '{split}' (it has {', '.join(source)})", file=name, field="split",
                             fix=f"set the split to one of {', '.join(source)}")
        source = source[split]
    if isinstance(source, datasets.Dataset):
        source = source.to_list()
    if isinstance(source, Mapping) or not hasattr(source, "__iter__"):
        raise InputError(f"rows must be a list of dicts, a datasets.Dataset or a path, got {type(source).__name__}",
                         file=name, fix="pass [{'prompt': ..., ...}, ...], a Dataset, or a file name")
    count = 0
    for i, row in enumerate(source):
        if not isinstance(row, Mapping):
            raise InputError(f"a row must be a dict, got {type(row).__name__}", file=f"{name}[{i}]",
                             fix="give each row as {'prompt': ..., ...}")
        count += 1
        yield dict(row), f"{name}[{i}]", None
    if count == 0:
        raise InputError("no rows", file=name, fix="give at least one row")


def _detect_preference(first: dict[str, Any]) -> str:
    """``group`` if the first row has completions, else ``pair`` (its errors then name chosen/rejected)."""
    if first.get("completions") is not None:
        return "group"
    if first.get("chosen") is not None or first.get("rejected") is not None:
        return "pair"
    near = difflib.get_close_matches("completions", [k for k in first if k not in _USED["pair"]], n=1, cutoff=0.6)
    return "group" if near else "pair"


def normalise_row(ctx: _Ctx, *, require_rewards: bool = False) -> dict[str, Any]:
    """The normalised form of one raw row (see the module docstring), or :class:`InputError`."""
    row, kind = ctx.row, ctx.kind
    if kind == "pair" and row.get("completions") is not None and row.get("chosen") is None:
        raise ctx.error("completions", "a group row in a file of pair rows",
                        "keep one format per file (pair rows or group rows)")
    if kind == "group" and row.get("completions") is None and row.get("chosen") is not None:
        raise ctx.error("chosen", "a pair row where a group row was expected",
                        "convert it to {\"prompt\", \"completions\": [chosen, rejected]} or load the file as pairs")
    extras = {k: v for k, v in row.items() if k not in _USED[kind]}
    if kind == "prompt":
        return {"prompt": _prompt_only(ctx), **extras}
    if kind == "sft":
        prompt, completion = _sft(ctx)
        return {"prompt": prompt, "completion": completion, **extras}
    if kind == "pair":
        names = ["chosen", "rejected"]
        values = [ctx.get("chosen"), ctx.get("rejected")]
        for name, value in zip(names, values):
            if value is None:
                raise ctx.missing(name)
    else:
        values = ctx.get("completions")
        if values is None:
            raise ctx.missing("completions")
        if not isinstance(values, list):
            raise ctx.error("completions", f"must be a list of completions, got {json_type(values)}",
                            'write "completions": ["...", "..."]')
        if len(values) < 2:
            raise ctx.error("completions", f"has {len(values)} completion(s); a group needs at least 2",
                            "give 2 or more completions per prompt (or load the file as sft rows)")
        names = [f"completions[{i}]" for i in range(len(values))]
    texts, before = [], None
    for name, value in zip(names, values):
        text, turns = _completion(ctx, value, name)
        texts.append(text)
        if turns is not None:
            if before is not None and turns != before:
                raise ctx.error(name, "its conversation starts differently from the first completion's",
                                "give every completion the same turns before the final reply")
            before = turns
    prompt = _prompt(ctx, before)
    against = "completions" if kind == "group" else "chosen/rejected"
    rewards = _rewards(ctx, len(texts), against)
    if rewards is None and require_rewards:
        raise ctx.error("rewards", "missing, but reward targets need one reward per completion",
                        "score the groups (`exoalign score`) or train with pref targets")
    sampled = _sampled(ctx, len(texts), against)
    return {"prompt": prompt, "completions": texts, "rewards": rewards, **sampled, **extras}


# ---------------------------------------------------------------------------------------- fields
def _text(ctx: _Ctx, value: Any, field: str) -> str:
    """A non-blank string that can be written as UTF-8 (no unpaired surrogates from ``\\ud800`` escapes)."""
    if not isinstance(value, str):
        raise ctx.error(field, f"must be a string, got {json_type(value)}", "give text")
    if not value.strip():
        raise ctx.error(field, "is empty", "give non-empty text (or drop the row)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ctx.error(field, "holds an unpaired surrogate escape (\\ud800-\\udfff)",
                        "fix the text's unicode escapes") from None
    return value


def _completion(ctx: _Ctx, value: Any, field: str) -> tuple[str, list[dict[str, str]] | None]:
    """``(completion text, conversation turns before it or None)`` from a string or a message list."""
    if isinstance(value, list):
        messages = check_messages(value, file=ctx.file, line=ctx.line, field=field)
        before, content = split_final_assistant(messages, file=ctx.file, line=ctx.line, field=field)
        return _text(ctx, content, f"{field}[-1].content"), before
    return _text(ctx, value, field), None


def _prompt(ctx: _Ctx, before: list[dict[str, str]] | None) -> str:
    """The prompt text: a string, or a conversation (``prompt``/``messages`` + turns before the replies)."""
    prompt, messages = ctx.get("prompt"), ctx.get("messages")
    if prompt is not None and messages is not None:
        raise ctx.error("messages", "given together with 'prompt'", "give the prompt once: 'prompt' or 'messages'")
    if prompt is None and messages is not None:
        if not isinstance(messages, list):  # text belongs in 'prompt'; 'messages' is always a conversation
            raise ctx.error("messages", f"must be a list of messages, got {json_type(messages)}",
                            'give [{"role": "user", "content": "..."}, ...], or the text as "prompt"')
        prompt, field = messages, "messages"
    else:
        field = "prompt"
    if prompt is None and not before:
        raise ctx.missing("prompt")
    if isinstance(prompt, str):
        if before:
            raise ctx.error(field, "is text but the completions are conversations with earlier turns",
                            "give the prompt as a message list, or the completions as text")
        return _text(ctx, prompt, field)
    turns: list[dict[str, str]] = []
    if prompt is not None:
        if not isinstance(prompt, list):
            raise ctx.error(field, f"must be a string or a list of messages, got {json_type(prompt)}", "give text")
        turns = check_messages(prompt, file=ctx.file, line=ctx.line, field=field)
    return render_prompt(ctx.tokenizer, turns + list(before or []), file=ctx.file, line=ctx.line, field=field)


def _rewards(ctx: _Ctx, n: int, against: str) -> list[float] | None:
    value = ctx.get("rewards")
    if value is None and ctx.kind == "pair":
        value = _pair_scores(ctx)
    if value is None:
        return None
    if not isinstance(value, list):
        raise ctx.error("rewards", f"must be a list of numbers, got {json_type(value)}", "write \"rewards\": [0.5, -1.2, ...]")
    if len(value) != n:
        raise ctx.error("rewards", f"has {len(value)} values but '{against}' has {n}",
                        "give one reward per completion")
    out = []
    for i, r in enumerate(value):
        if not is_finite_number(r):
            what = "is not finite" if isinstance(r, (int, float)) and not isinstance(r, bool) else f"must be a number, got {json_type(r)}"
            raise ctx.error(f"rewards[{i}]", f"{what} ({r!r})"[:120], "give finite numbers (re-score NaN/inf rewards)")
        out.append(float(r))
    return out


def _pair_scores(ctx: _Ctx) -> list[Any] | None:
    """``[score_chosen, score_rejected]`` (ultrafeedback_binarized's fields): the pair's rewards, or None."""
    scores = [ctx.get("score_chosen"), ctx.get("score_rejected")]
    if scores == [None, None]:
        return None
    for field, value in zip(("score_chosen", "score_rejected"), scores):
        if not is_finite_number(value):
            got = "missing" if value is None else f"must be a finite number, got {value!r}"[:80]
            raise ctx.error(field, f"{got} (score_chosen and score_rejected are the pair's rewards)",
                            "give both scores as numbers, or neither")
    return scores


def _sampled(ctx: _Ctx, n: int, against: str) -> dict[str, Any]:
    """The optional per-completion ``finished`` flags and sampled ``completion_ids`` of a row, validated."""
    out: dict[str, Any] = {}
    finished = ctx.get("finished")
    if finished is not None:
        if not isinstance(finished, list) or not all(isinstance(f, bool) for f in finished):
            raise ctx.error("finished", f"must be a list of true/false, got {json_type(finished)}"[:120],
                            'write "finished": [true, false, ...] (did each completion end with EOS)')
        if len(finished) != n:
            raise ctx.error("finished", f"has {len(finished)} values but '{against}' has {n}",
                            "give one flag per completion")
        out["finished"] = list(finished)
    ids = ctx.get("completion_ids")
    if ids is not None:
        ok = isinstance(ids, list) and all(
            isinstance(c, list) and c and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in c)
            for c in ids)
        if not ok:
            raise ctx.error("completion_ids", "must be a list of non-empty lists of token ids",
                            "drop the field (the texts are then tokenised) or write [[12, 7, ...], ...]")
        if len(ids) != n:
            raise ctx.error("completion_ids", f"has {len(ids)} lists but '{against}' has {n}",
                            "give one id list per completion, or drop the field")
        out["completion_ids"] = [list(c) for c in ids]
    return out


def _sft(ctx: _Ctx) -> tuple[str, str]:
    messages = ctx.get("messages")
    if messages is not None and ctx.get("prompt") is None and ctx.get("completion") is None:
        turns = check_messages(messages, file=ctx.file, line=ctx.line, field="messages")
        before, content = split_final_assistant(turns, file=ctx.file, line=ctx.line, field="messages")
        text = _text(ctx, content, "messages[-1].content")
        return render_prompt(ctx.tokenizer, before, file=ctx.file, line=ctx.line, field="messages"), text
    value = ctx.get("completion")
    if value is None:
        raise ctx.missing("completion")
    text, before = _completion(ctx, value, "completion")
    return _prompt(ctx, before), text


def _prompt_only(ctx: _Ctx) -> str:
    messages = ctx.get("messages")
    if messages is not None and ctx.get("prompt") is None:
        turns = check_messages(messages, file=ctx.file, line=ctx.line, field="messages")
        if turns[-1]["role"] == "assistant":  # an sft-style conversation: the prompt is what precedes the reply
            turns = turns[:-1]
        return render_prompt(ctx.tokenizer, turns, file=ctx.file, line=ctx.line, field="messages")
    return _prompt(ctx, None)
