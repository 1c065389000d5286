"""Presets: the common public preference datasets read as they are published (``data.preset=NAME``).

A preset turns one raw row of its dataset into one of our rows, before validation; ``docs/data.md`` lists each
with the rows it expects. :func:`suggest` looks at a row that failed validation and names the preset (or the
``data.columns`` map) that fits it, so a near-miss schema gets a fix that works instead of a puzzling one.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import InputError
from .columns import apply_columns

ASSISTANT = "\n\nAssistant:"
HUMAN = "\n\nHuman:"


@dataclass(frozen=True)
class Preset:
    """A public dataset's schema: how its rows become ours, and how to recognise one."""

    name: str
    dataset: str
    """The hub dataset (or family) it reads, for messages and docs."""
    convert: Callable[[dict[str, Any], str, str, int | None], dict[str, Any]]
    """``(raw row, kind, file, line) -> row`` in our format (validation follows)."""
    looks_like: Callable[[Mapping[str, Any]], bool]
    """Whether a raw row (that failed as our format) has this schema."""


# ----------------------------------------------------------------------------------------- hh-rlhf
def split_hh(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """``(prompt, chosen reply, rejected reply)`` of two HH dialogues, split at the last ``"\\n\\nAssistant:"``
    both contain in full (the dialogues agree up to the final reply); None when they share no assistant turn.

    The prompt ends with ``"Assistant:"`` and loses its leading newlines; the replies lose trailing whitespace.
    """
    shared = len(os.path.commonprefix([chosen, rejected]))
    at = chosen.rfind(ASSISTANT, 0, shared)
    if at < 0:
        return None
    cut = at + len(ASSISTANT)
    return chosen[:cut].lstrip("\n"), chosen[cut:].rstrip(), rejected[cut:].rstrip()


def _hh(row: dict[str, Any], kind: str, file: str, line: int | None) -> dict[str, Any]:
    for name in ("chosen", "rejected"):
        if not isinstance(row.get(name), str):
            got = "missing" if row.get(name) is None else f"must be a dialogue string, got {type(row[name]).__name__}"
            raise InputError(got, file=file, line=line, field=name,
                             fix='an hh-rlhf row is {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}')
    split = split_hh(row["chosen"], row["rejected"])
    if split is None:
        raise InputError("no '\\n\\nAssistant:' turn shared by 'chosen' and 'rejected'", file=file, line=line,
                         field="chosen", fix="give two dialogues that agree up to the final assistant reply")
    prompt, chosen, rejected = split
    out = {k: v for k, v in row.items() if k not in ("chosen", "rejected")}
    if kind == "sft":
        return {**out, "prompt": prompt, "completion": chosen}
    return {**out, "prompt": prompt, "chosen": chosen, "rejected": rejected}


def _looks_hh(row: Mapping[str, Any]) -> bool:
    c, r = row.get("chosen"), row.get("rejected")
    return row.get("prompt") is None and isinstance(c, str) and isinstance(r, str) and ASSISTANT in c


# ------------------------------------------------------------------------------------ UltraFeedback
ULTRAFEEDBACK_COLUMNS = {"prompt": "instruction", "completions": "completions[].response",
                         "rewards": "completions[].overall_score"}


def _ultrafeedback(row: dict[str, Any], kind: str, file: str, line: int | None) -> dict[str, Any]:
    columns = {"prompt": "instruction"} if kind == "prompt" else ULTRAFEEDBACK_COLUMNS
    return apply_columns(row, columns, file=file, line=line)


def _looks_ultrafeedback(row: Mapping[str, Any]) -> bool:
    c = row.get("completions")
    return (row.get("instruction") is not None and isinstance(c, list) and bool(c)
            and all(isinstance(x, Mapping) and "response" in x for x in c))


def _binarized(row: dict[str, Any], kind: str, file: str, line: int | None) -> dict[str, Any]:
    """HuggingFaceH4/ultrafeedback_binarized (and trl-lib's): ``messages`` repeats ``chosen``, and ``prompt`` is
    the user turn already inside the ``chosen``/``rejected`` conversations, so both are dropped; the scores
    become the pair's rewards (see ``formats.py``). As sft rows, the chosen conversation is the row."""
    if kind == "sft":  # the chosen conversation is the sft row
        out = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected", "score_chosen", "score_rejected")}
        return {**out, "messages": row.get("messages") or row.get("chosen")}
    out = {k: v for k, v in row.items() if k != "messages"}
    if kind == "prompt":
        return out
    chosen = row.get("chosen")
    if isinstance(chosen, list) and len(chosen) > 1 and isinstance(row.get("prompt"), str):
        out.pop("prompt")  # the implicit prompt: the turns before the final reply
    return out


def _looks_binarized(row: Mapping[str, Any]) -> bool:
    return isinstance(row.get("chosen"), list) and (row.get("messages") is not None or row.get("prompt_id") is not None
                                                    or row.get("score_chosen") is not None)


# ---------------------------------------------------------------------------------- SHP, PKU-SafeRLHF
def _choose(row: dict[str, Any], first: str, second: str, first_wins: bool, prompt: str,
            used: tuple[str, ...]) -> dict[str, Any]:
    out = {k: v for k, v in row.items() if k not in used}
    a, b = row.get(first), row.get(second)
    return {**out, "prompt": row.get(prompt), "chosen": a if first_wins else b, "rejected": b if first_wins else a}


def _shp(row: dict[str, Any], kind: str, file: str, line: int | None) -> dict[str, Any]:
    label = row.get("labels")
    if label not in (0, 1):
        raise InputError(f"must be 1 (A preferred) or 0 (B preferred), got {label!r}", file=file, line=line,
                         field="labels", fix="give SHP rows as published")
    return _choose(row, "human_ref_A", "human_ref_B", label == 1, "history",
                   ("history", "human_ref_A", "human_ref_B", "labels"))


def _pku(row: dict[str, Any], kind: str, file: str, line: int | None) -> dict[str, Any]:
    better = row.get("better_response_id")
    if better not in (0, 1):
        raise InputError(f"must be 0 or 1, got {better!r}", file=file, line=line, field="better_response_id",
                         fix="give PKU-SafeRLHF rows as published")
    return _choose(row, "response_0", "response_1", better == 0, "prompt",
                   ("response_0", "response_1", "better_response_id"))


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("hh-rlhf", "Anthropic/hh-rlhf", _hh, _looks_hh),
    Preset("ultrafeedback", "openbmb/UltraFeedback", _ultrafeedback, _looks_ultrafeedback),
    Preset("ultrafeedback-binarized", "HuggingFaceH4/ultrafeedback_binarized", _binarized, _looks_binarized),
    Preset("shp", "stanfordnlp/SHP", _shp, lambda r: r.get("history") is not None and "human_ref_A" in r),
    Preset("pku-saferlhf", "PKU-Alignment/PKU-SafeRLHF", _pku, lambda r: "response_0" in r and "better_response_id" in r),
)}


def get_preset(name: str, field: str = "data.preset") -> Preset:
    """The preset called ``name``, or :class:`InputError` naming the close one."""
    if name in PRESETS:
        return PRESETS[name]
    close = difflib.get_close_matches(str(name).lower().replace("_", "-"), list(PRESETS), n=1, cutoff=0.5)
    fix = f"did you mean '{close[0]}'?" if close else f"use one of {', '.join(PRESETS)} (or map fields with data.columns)"
    raise InputError(f"unknown preset {name!r}", field=field, fix=fix)


# ------------------------------------------------------------------------------------- suggestions
# Field names public datasets use for ours, in order of preference.
SYNONYMS = {
    "prompt": ("instruction", "question", "query", "input", "history", "context", "problem", "prompt_text"),
    "chosen": ("chosen_response", "response_chosen", "preferred", "better", "winner", "good", "accepted"),
    "rejected": ("rejected_response", "response_rejected", "dispreferred", "worse", "loser", "bad"),
    "completions": ("responses", "outputs", "answers", "generations", "candidates", "samples"),
    "completion": ("response", "output", "answer", "target", "reply"),
    "rewards": ("scores", "ratings", "reward", "score"),
}
_TEXT_KEYS = ("response", "text", "content", "output", "completion", "answer")
_SCORE_KEYS = ("overall_score", "score", "reward", "rating")


def _record_keys(value: Any, keys: tuple[str, ...], test: Callable[[Any], bool]) -> str | None:
    """The first of ``keys`` that every record of the list ``value`` has with a value passing ``test``."""
    if not (isinstance(value, list) and value and all(isinstance(x, Mapping) for x in value)):
        return None
    return next((k for k in keys if all(test(x.get(k)) for x in value)), None)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def suggest_columns(row: Mapping[str, Any], kind: str) -> dict[str, str]:
    """A ``data.columns`` map that would give ``row`` the fields ``kind`` reads, from common names; may be empty."""
    wanted = {"pair": ("prompt", "chosen", "rejected"), "group": ("prompt", "completions", "rewards"),
              "sft": ("prompt", "completion"), "prompt": ("prompt",)}.get(kind, ("prompt",))
    lists = ("completions", *SYNONYMS["completions"])
    out: dict[str, str] = {}
    for ours in wanted:
        if ours in ("completions", "rewards"):  # a list of records: map each record's text (or score) field
            keys, test = (_TEXT_KEYS, _is_text) if ours == "completions" else (_SCORE_KEYS, _is_number)
            found = next((f"{name}[].{key}" for name in lists
                          if (key := _record_keys(row.get(name), keys, test))), None)
            if found:
                out[ours] = found
                continue
        if row.get(ours) is None:
            name = next((s for s in SYNONYMS[ours] if row.get(s) is not None), None)
            if name:
                out[ours] = name
    return out


def _is_text(v: Any) -> bool:
    return isinstance(v, str)


def suggest(row: Mapping[str, Any], kind: str) -> str | None:
    """A fix for a row that failed validation: the preset whose schema it has, else a column map; or None."""
    for preset in PRESETS.values():
        try:
            if preset.looks_like(row):
                return f"it looks like a {preset.dataset} row: set data.preset={preset.name} (preset='{preset.name}' in Python)"
        except Exception:  # a check on an odd row must never hide the real error
            continue
    columns = suggest_columns(row, kind)
    if columns:
        text = ", ".join(f"{k}: {v}" for k, v in columns.items())
        return f"map its fields onto ours: data.columns={{{text}}} (columns={{...}} in Python)"
    return None
