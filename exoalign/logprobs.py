"""Sequence log-probabilities of completions, computed without the full ``[B, T, V]`` log-softmax.

Layout of a batch (see ``exoalign.data.collate``): prompts are left-padded and completions right-padded, so
every completion starts at the same column ``P`` of the batch::

    [pad pad p p p | c c c c pad]      labels = -100 everywhere except the completion tokens
    [  p p p p p   | c c pad pad pad]

The model is asked for logits only from column ``P − 1`` on (``logits_to_keep``), i.e. only where completion
tokens are predicted. Each token's log-prob is ``logit[target] − logsumexp(logits)``, computed in chunks of
rows so that no second ``[N, V]`` tensor (the log-softmax) is kept for backward.
"""

from __future__ import annotations

import inspect

import torch

IGNORE = -100


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 on the first real token of each (left-padded) row. ``[B, T]``."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)


def token_logps(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, chunk: int = 4096) -> torch.Tensor:
    """``log softmax(logits / temperature)[target]`` for each row of ``logits`` ``[N, V]``; returns ``[N]``.

    Equivalent to ``logits.log_softmax(-1).gather(-1, targets)`` but never holds the ``[N, V]`` log-softmax:
    only the gathered logit and a per-row ``logsumexp`` are kept, chunk by chunk.
    """
    if temperature != 1.0:
        logits = logits / temperature
    out = []
    for start in range(0, logits.shape[0], chunk):
        block = logits[start : start + chunk]  # (n, V)
        tgt = targets[start : start + chunk].clamp(min=0)
        picked = block.gather(-1, tgt.unsqueeze(-1)).squeeze(-1).float()  # (n,)
        out.append(picked - torch.logsumexp(block.float(), dim=-1))
    return torch.cat(out) if out else logits.new_zeros(0)


def _accepts(model: torch.nn.Module, name: str) -> bool:
    inner = getattr(model, "module", model)  # DDP / accelerate wrappers
    try:
        return name in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


def sequence_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs ``[N]`` and completion lengths ``[N]`` for a batch of rows ``[N, T]``.

    ``labels`` holds the token ids whose log-prob is summed and ``-100`` elsewhere (prompt and padding). The
    logits are divided by ``temperature`` first (the sampling temperature, as in the EXO authors' code).
    """
    valid = labels != IGNORE  # (N, T)
    lengths = valid.sum(-1)
    T = input_ids.shape[1]
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    # First column holding a completion token in any row; logits at column t predict token t + 1.
    any_valid = valid.any(0)
    first = int(any_valid.float().argmax()) if bool(any_valid.any()) else T - 1
    start = max(first - 1, 0)
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, "use_cache": False}
    if _accepts(model, "logits_to_keep"):
        logits = model(**kwargs, logits_to_keep=T - start).logits  # (N, T - start, V)
    else:
        logits = model(**kwargs).logits[:, start:]
    logits = logits[:, :-1]  # (N, T - start - 1, V): predictions for columns start+1 .. T-1
    targets = labels[:, start + 1 :]  # (N, T - start - 1)
    keep = targets != IGNORE
    flat_logits = logits[keep]  # (n_tokens, V): only completion positions
    lp = token_logps(flat_logits, targets[keep], temperature)  # (n_tokens,)
    per_token = torch.zeros(targets.shape, dtype=lp.dtype, device=lp.device)
    per_token[keep] = lp
    return per_token.sum(-1), lengths
