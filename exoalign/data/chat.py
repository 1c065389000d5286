"""Conversational rows: message lists rendered to text with the tokeniser's chat template.

A message is ``{"role": str, "content": str}``. Where a conversation stands for a prompt it is rendered with
``add_generation_prompt=True`` (the text ends where the assistant's reply begins); where it stands for a
completion, the completion is the *content* of its final assistant turn, and any turns before that are the
prompt. The end-of-turn marker is not part of the completion text: ``tokenize_rows`` appends EOS instead.
"""

from __future__ import annotations

from typing import Any

from ..errors import InputError


def is_messages(value: Any) -> bool:
    """Whether ``value`` is meant as a conversation (a non-empty list whose items are objects)."""
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def check_messages(value: Any, *, file: str, line: int, field: str) -> list[dict[str, str]]:
    """``value`` as a validated list of ``{"role", "content"}`` messages, or :class:`InputError`."""
    if not isinstance(value, list) or not value:
        raise InputError("must be a non-empty list of messages", file=file, line=line, field=field,
                         fix='give [{"role": "user", "content": "..."}, ...]')
    out = []
    for i, msg in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(msg, dict):
            raise InputError(f"a message must be an object, got {type(msg).__name__}", file=file, line=line,
                             field=where, fix='write {"role": ..., "content": ...}')
        for key in ("role", "content"):
            if key not in msg:
                raise InputError(f"message has no '{key}'", file=file, line=line, field=where,
                                 fix='write {"role": ..., "content": ...}')
            if not isinstance(msg[key], str):
                raise InputError(f"'{key}' must be a string, got {type(msg[key]).__name__}", file=file,
                                 line=line, field=f"{where}.{key}", fix="give text (multimodal content is not supported)")
        if not msg["role"].strip():
            raise InputError("empty role", file=file, line=line, field=f"{where}.role",
                             fix="use system, user or assistant")
        out.append(dict(msg))
    return out


def split_final_assistant(messages: list[dict[str, str]], *, file: str, line: int, field: str
                          ) -> tuple[list[dict[str, str]], str]:
    """``(turns before, content of the final assistant turn)``; the final turn must be the assistant's."""
    if messages[-1]["role"] != "assistant":
        raise InputError(f"the last message is from '{messages[-1]['role']}', not the assistant", file=file,
                         line=line, field=field, fix="end the conversation with the assistant's reply")
    return messages[:-1], messages[-1]["content"]


def render_prompt(tokenizer: Any, messages: list[dict[str, str]], *, file: str, line: int, field: str) -> str:
    """The chat template applied to ``messages`` with the generation prompt (the assistant turn's opening)."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        # No tokeniser here means none was loaded: a model built from scratch (its tokeniser is trained on the
        # spot, without a template) or a stage that reads text only.
        what = ("the tokeniser has no chat template" if tokenizer is not None else
                "no tokeniser with one is used here (a model.init=scratch model has none)")
        raise InputError(f"conversational rows need the model's chat template, but the model has none: {what}",
                         file=file, line=line, field=field,
                         fix="use a model whose tokeniser has a chat template (e.g. smollm2), or give plain-text prompts")
    if not messages:
        raise InputError("the conversation has no turns before the assistant's reply", file=file, line=line,
                         field=field, fix="put the user's message before the assistant's reply")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja raises TemplateError (or anything the template calls); it is the data's fault
        raise InputError(f"the chat template rejected the conversation ({str(e).splitlines()[0] if str(e) else type(e).__name__})",
                         file=file, line=line, field=field, fix="check the roles and their order") from None
    if not isinstance(text, str) or not text.strip():
        raise InputError("the chat template rendered an empty prompt", file=file, line=line, field=field,
                         fix="check the conversation and the tokeniser's chat template")
    return text
