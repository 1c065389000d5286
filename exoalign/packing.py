"""Prompt sharing: encode a group's prompt once for all K of its completions.

The collated group batch (``exoalign.data``) holds K rows per prompt, each ``prompt + completion_k``, so the
prompt is encoded K times. Here each group becomes one row, the prompt once followed by all K completions::

    collated (K = 2 rows):  [pad p p p | a a a pad]       shared (1 row):  [pad p p p | a a a | b b]
                            [pad p p p | b b pad pad]     segment:         [ -1 0 0 0 | 1 1 1 | 2 2]
                                                          position:        [  0 0 1 2 | 3 4 5 | 3 4]

with a 4-D attention mask ``[B, 1, L, L]`` that lets a completion token see the prompt and the earlier tokens
of its own completion only (causally), and position ids that restart after the prompt for every completion.
Each completion then sees exactly the context it has in its own row, so its log-prob is the same number (up to
float rounding) while the prompt's share of the work is paid once instead of K times. The first token of every
completion is predicted from the prompt's last position, so that one logit row is shared by the K completions.

The 4-D mask goes through transformers' own attention paths, which pass a ready 4-D mask through untouched:
an additive float mask for SDPA and eager attention (a boolean one for SDPA under autocast). Logits are
computed only at the positions that predict a completion token. Models whose attention cannot take such a
mask (FlashAttention's varlen kernels, ALiBi models such as Bloom, recurrent models, custom code) are detected by
:func:`supports_shared_prefix`, which also runs a tiny numerical probe once per model, and
:func:`shared_prefix_logps` then falls back to the unshared layout. Sliding-window models (Mistral, Gemma2,
Gemma3) share too: a ready 4-D mask replaces the window, which is exact as long as no sequence is longer than
the window (``data.max_length`` ≤ ``sliding_window``); a batch longer than the window falls back.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch

from .attention import LAYOUT_ATTR, SharedLayout
from .logprobs import (
    IGNORE,
    ProbeCache,
    _accepts,
    completion_token_logps,
    position_ids_from_mask,
    probing,
    sequence_logps,
    unwrap_model,
)

log = logging.getLogger(__name__)

#: Attention implementations known to honour a custom 4-D mask as given.
MASKED_ATTENTION = ("sdpa", "eager")
_PROBES = ProbeCache()  # prefix-sharing verdicts, per model and per architecture
_WARNED: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()


@dataclass
class SharedPrefixBatch:
    """A group batch in the shared layout: one row per group. ``L`` = prompt block + all completions."""

    input_ids: torch.Tensor  # (B, L)
    position_ids: torch.Tensor  # (B, L)
    segments: torch.Tensor  # (B, L): -1 padding, 0 prompt, k + 1 completion k
    predict: torch.Tensor  # (B, L) bool: positions whose logits are needed
    pred_index: torch.Tensor  # (n,) index of each completion token's predicting position among predict's True
    targets: torch.Tensor  # (n,) the completion tokens (labels)
    slots: torch.Tensor  # (n,) flat group slot b * K + k of each token
    lengths: torch.Tensor  # (B, K) labelled tokens per completion
    prompt_end: int  # P: first completion column of the collated batch = prompt block width

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.lengths.shape)  # (B, K)


def pack_shared_prefix(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    group_mask: torch.Tensor,
) -> SharedPrefixBatch | None:
    """Turn a collated group batch ``[B*K, T]`` into the shared layout; ``None`` if there is nothing to share.

    Columns ``< P`` (``P`` = the first labelled column) are the left-padded prompt, identical across the valid
    slots of a group; columns ``≥ P`` hold the right-padded completion. Masked slots (``group_mask`` False) are
    dropped. ``None`` when no token is labelled or the prompt block is empty (no position predicts the first
    token then). Raises ``ValueError`` when the rows of a group do not share their prompt.
    """
    B, K = group_mask.shape
    N, T = input_ids.shape
    if N != B * K:
        raise ValueError(f"batch has {N} rows but group_mask is {B}x{K}")
    device = input_ids.device
    gm = group_mask.to(device=device, dtype=torch.bool)
    labelled = (labels != IGNORE) & gm.view(N, 1)  # (N, T)
    any_col = labelled.any(0)
    if not bool(any_col.any()):
        return None
    P = int(any_col.float().argmax())
    if P == 0:
        return None
    C = T - P
    am = attention_mask.to(device=device, dtype=torch.bool)

    # The prompt block: taken from each group's first valid slot, checked equal across its valid slots.
    first_slot = gm.float().argmax(-1)  # (B,)
    src_rows = torch.arange(B, device=device) * K + first_slot  # (B,)
    prompt_ids, prompt_am = input_ids[src_rows, :P], am[src_rows, :P]  # (B, P)
    same = (input_ids[:, :P].view(B, K, P) == prompt_ids[:, None]) & (am[:, :P].view(B, K, P) == prompt_am[:, None])
    if not bool((same.all(-1) | ~gm).all()):
        raise ValueError("prefix sharing needs the K rows of a group to hold the same prompt (left-padded)")

    # Completion tokens of each slot: right-padded from column P, so a contiguous run of length c.
    comp = am[:, P:] & gm.view(N, 1)  # (N, C)
    c = comp.sum(-1)  # (N,)
    j = torch.arange(C, device=device)  # (C,)
    if not bool((comp == (j < c[:, None])).all()):
        raise ValueError("prefix sharing needs right-padded completions starting at the same column")
    c_bk = c.view(B, K)
    offset = P + c_bk.cumsum(-1) - c_bk  # (B, K): column where each completion starts in the shared row
    L = P + int(c_bk.sum(-1).max())

    slot = torch.arange(N, device=device)  # (N,)
    b_of = slot // K
    dest = offset.view(N, 1) + j  # (N, C): destination column of every completion column
    flat_dest = (b_of[:, None] * L + dest)[comp]  # (n_comp,)

    ids = prompt_ids.new_zeros(B, L)  # padding id is irrelevant: padding is masked out
    ids[:, :P] = prompt_ids
    ids.view(-1)[flat_dest] = input_ids[:, P:][comp]
    segments = torch.full((B, L), -1, dtype=torch.long, device=device)
    segments[:, :P] = torch.where(prompt_am, 0, -1)
    segments.view(-1)[flat_dest] = (slot % K + 1)[:, None].expand(N, C)[comp]
    pos = torch.zeros(B, L, dtype=torch.long, device=device)
    pos[:, :P] = position_ids_from_mask(prompt_am)
    prompt_len = prompt_am.sum(-1)  # (B,)
    pos.view(-1)[flat_dest] = (prompt_len[b_of][:, None] + j)[comp]

    # Which position predicts each labelled completion token: the prompt's last column for the first token,
    # the previous column of the same completion otherwise.
    tgt = comp & (labels[:, P:] != IGNORE)  # (N, C)
    pred_col = torch.where(j == 0, P - 1, dest - 1)  # (N, C)
    pred_flat = (b_of[:, None] * L + pred_col)[tgt]  # (n,)
    predict = torch.zeros(B * L, dtype=torch.bool, device=device)
    predict[pred_flat] = True
    # Rank of each position among the True ones = its row in the compact [n_pred, V] logits.
    rank = predict.long().cumsum(0) - 1
    return SharedPrefixBatch(
        input_ids=ids,
        position_ids=pos,
        segments=segments,
        predict=predict.view(B, L),
        pred_index=rank[pred_flat],
        targets=labels[:, P:][tgt],
        slots=slot[:, None].expand(N, C)[tgt],
        lengths=labelled.sum(-1).view(B, K),
        prompt_end=P,
    )


def shared_prefix_mask(segments: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The 4-D mask ``[B, 1, L, L]`` for :class:`SharedPrefixBatch` segments ``[B, L]``.

    Query ``i`` may attend key ``j`` iff ``j ≤ i``, ``j`` is not padding, and ``j`` is in the prompt or in the
    same completion as ``i``. Padding positions attend to themselves only, so no softmax row is empty (an empty
    row is NaN in SDPA). ``dtype=None`` gives a boolean mask (True = attend, as SDPA takes it); a float dtype
    gives the additive mask eager attention adds to its scores (0 or the dtype's most negative value).
    """
    L = segments.shape[1]
    q = segments[:, :, None]  # (B, L, 1)
    k = segments[:, None, :]  # (B, 1, L)
    causal = torch.ones(L, L, dtype=torch.bool, device=segments.device).tril_()  # (L, L)
    allowed = causal & (k >= 0) & ((k == 0) | (k == q))  # (B, L, L)
    allowed |= torch.eye(L, dtype=torch.bool, device=segments.device)
    allowed = allowed[:, None]  # (B, 1, L, L)
    if dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min
    )


def _mask_for(model: torch.nn.Module, segments: torch.Tensor) -> torch.Tensor:
    """The mask in the form the model's attention takes without converting it in every layer.

    Eager attention adds the mask to its scores, so it needs the additive float form. SDPA takes either; a
    float mask of the query's dtype saves the bool → float conversion it would otherwise do per layer and per
    backward, but under autocast the query's dtype is the autocast one, so the boolean form is used there.
    """
    inner = unwrap_model(model)
    dtype = next(inner.parameters()).dtype
    dtype = dtype if dtype.is_floating_point else torch.float32
    impl = getattr(inner.config, "_attn_implementation", "eager")
    if impl == "sdpa" and torch.is_autocast_enabled(segments.device.type):
        return shared_prefix_mask(segments)
    return shared_prefix_mask(segments, dtype)


def _static_support(model: torch.nn.Module) -> str | None:
    """Why ``model`` cannot take the shared layout, from its config alone; ``None`` if nothing rules it out."""
    inner = unwrap_model(model)
    config = getattr(inner, "config", None)
    if config is None:
        return "no transformers config"
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder model"
    impl = getattr(config, "_attn_implementation", None)
    if impl not in MASKED_ATTENTION:
        return f"attention implementation {impl!r} (a custom 4-D mask needs one of {', '.join(MASKED_ATTENTION)})"
    if getattr(config, "alibi", False) or config.model_type in ("bloom", "mpt"):
        return "ALiBi positions are derived from the 2-D mask"
    if not (_accepts(inner, "position_ids") and _accepts(inner, "attention_mask")):
        return "forward takes no position_ids / attention_mask"
    return None


def sliding_window(model: torch.nn.Module) -> int | None:
    """The model's attention window in tokens, or None when it attends to the whole sequence.

    A ready 4-D mask replaces the window in transformers' mask builders, so the shared layout is exact only for
    batches whose unshared sequences fit in the window (query ``i`` sees key ``j`` iff ``i − j < window``).
    """
    config = getattr(unwrap_model(model), "config", None)
    if config is None or getattr(config, "use_sliding_window", True) is False:
        return None
    window = getattr(config, "sliding_window", None)
    return int(window) if window else None


def _probe(model: torch.nn.Module) -> bool:
    """Compare the shared and unshared layouts on a tiny group batch: does this model honour the mask?"""
    inner = unwrap_model(model)
    param = next(inner.parameters())
    vocab = inner.get_input_embeddings().num_embeddings
    t = [1 + i % max(vocab - 1, 1) for i in range(9)]
    batch = collate_groups(
        [t[:3], t[3:5]], [[t[4:6], t[5:8]], [t[6:7], t[7:9] + t[:1]]], pad_id=0, device=param.device
    )
    try:
        with probing(inner):
            out = _shared_logps(inner, batch, 1.0)
            plain, _ = sequence_logps(inner, batch["input_ids"], batch["attention_mask"], batch["labels"])
    except Exception as e:  # any failure means: do not use this path for this model
        log.info("prefix sharing probe failed (%s: %s); using the unshared layout", type(e).__name__, e)
        return False
    if out is None:
        return False
    tol = 1e-3 if param.dtype in (torch.float32, torch.float64) else 5e-2
    return bool(torch.allclose(out[0], plain.view(2, 2), rtol=tol, atol=tol))


def supports_shared_prefix(model: torch.nn.Module) -> bool:
    """Whether ``model`` gives the same log-probs in the shared layout (config checks + a one-off probe).

    The answer is cached per model (and attention implementation), and a model that cannot take the shared
    layout is named in one warning, not one per step.
    """
    inner = unwrap_model(model)

    def probe() -> bool:
        reason = _static_support(inner)
        ok = reason is None and _probe(inner)
        if not ok:
            why = reason or "its log-probs in the shared layout differ from the unshared ones (probe)"
            log.warning("prefix sharing is off for %s: %s; using the unshared layout", type(inner).__name__, why)
        return ok

    return _PROBES.verdict(inner, probe)


def _shared_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], temperature: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The shared-layout forward pass: ``([B, K] log-probs, [B, K] lengths)``, or None if nothing to share."""
    reason = _static_support(model)
    if reason is not None:  # the same rule supports_shared_prefix applies, never a crash deep in the model
        raise ValueError(f"prefix sharing cannot serve {type(unwrap_model(model)).__name__}: {reason}")
    gm = batch["group_mask"]
    packed = pack_shared_prefix(batch["input_ids"], batch["attention_mask"], batch["labels"], gm)
    if packed is None:
        return None
    B, K = gm.shape
    mask = _mask_for(model, packed.segments)
    if packed.input_ids.device.type == "cpu":  # what the mask stands for, for exoalign.attention's CPU training path
        setattr(mask, LAYOUT_ATTR, SharedLayout(packed.segments, packed.prompt_end))
    # One logits row per predicting position; the prompt's last one serves K completions.
    lp = completion_token_logps(
        model,
        packed.predict,
        packed.targets,
        index=packed.pred_index,
        temperature=temperature,
        input_ids=packed.input_ids,
        attention_mask=mask,
        position_ids=packed.position_ids,
    )  # (n,)
    sums = torch.zeros(B * K, dtype=lp.dtype, device=lp.device).index_add(0, packed.slots, lp)  # (B*K,)
    return sums.view(B, K), packed.lengths


def shared_prefix_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs ``[B, K]`` (fp32) and lengths ``[B, K]``, encoding each prompt once.

    ``batch`` is the collated group batch: ``input_ids``, ``attention_mask``, ``labels`` ``[B*K, T]`` (prompts
    left-padded, completions right-padded) and ``group_mask`` ``[B, K]``. Equal to
    ``sequence_logps(model, input_ids, attention_mask, labels)`` viewed ``[B, K]`` (masked slots 0), and falls
    back to exactly that for models that cannot take the shared layout (:func:`supports_shared_prefix`).
    """
    gm = batch["group_mask"].to(torch.bool)
    B, K = gm.shape
    window = sliding_window(model)
    fits = window is None or batch["input_ids"].shape[1] <= window
    if not fits:
        _warn_once(model, f"a batch of {batch['input_ids'].shape[1]} tokens is longer than its attention window "
                          f"({window}); such batches use the unshared layout (set data.max_length <= {window})")
    out = _shared_logps(model, batch, temperature) if fits and supports_shared_prefix(model) else None
    if out is not None:
        return out
    logps, lengths = sequence_logps(
        model, batch["input_ids"], batch["attention_mask"], batch["labels"], temperature=temperature
    )
    gm = gm.to(logps.device)
    return logps.view(B, K).masked_fill(~gm, 0.0), lengths.view(B, K).masked_fill(~gm, 0)


def _warn_once(model: torch.nn.Module, why: str) -> None:
    inner = unwrap_model(model)
    if inner not in _WARNED:
        _WARNED.add(inner)
        log.warning("prefix sharing for %s: %s", type(inner).__name__, why)


def group_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], *, temperature: float = 1.0, prefix_sharing: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, K]`` log-probs and lengths of a collated group batch, with or without prompt sharing.

    The one call a training step needs: ``prefix_sharing=True`` uses :func:`shared_prefix_logps` (which falls
    back by itself), ``False`` the unshared :func:`~exoalign.logprobs.sequence_logps`.
    """
    if prefix_sharing:
        return shared_prefix_logps(model, batch, temperature)
    B, K = batch["group_mask"].shape
    logps, lengths = sequence_logps(
        model, batch["input_ids"], batch["attention_mask"], batch["labels"], temperature=temperature
    )
    return logps.view(B, K), lengths.view(B, K)


def collate_groups(
    prompts: list[list[int]],
    completions: list[list[list[int]]],
    pad_id: int,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Collate token lists into the group-batch layout (prompts left-, completions right-padded).

    ``prompts[b]`` is a list of ids, ``completions[b]`` a list of up to K id lists. Returns ``input_ids``,
    ``attention_mask``, ``labels`` ``[B*K, T]`` and ``group_mask`` ``[B, K]``; missing slots hold the prompt
    and no labels.
    Used by tests and benchmarks to build batches without a tokeniser; ``exoalign.data`` collates real data.
    """
    B = len(prompts)
    K = max(len(c) for c in completions)
    P = max(len(p) for p in prompts)
    C = max((len(y) for group in completions for y in group), default=0)
    ids = torch.full((B * K, P + C), pad_id, dtype=torch.long)
    am = torch.zeros(B * K, P + C, dtype=torch.long)
    labels = torch.full((B * K, P + C), IGNORE, dtype=torch.long)
    gm = torch.zeros(B, K, dtype=torch.bool)
    for b, (prompt, group) in enumerate(zip(prompts, completions, strict=True)):
        # Every slot holds the prompt, missing ones too (as GroupCollator does): an all-padding row is NaN in
        # some attention kernels.
        ids[b * K : (b + 1) * K, P - len(prompt) : P] = torch.tensor(prompt, dtype=torch.long)
        am[b * K : (b + 1) * K, P - len(prompt) : P] = 1
        for k, y in enumerate(group):
            r = b * K + k
            gm[b, k] = True
            ids[r, P : P + len(y)] = torch.tensor(y, dtype=torch.long)
            am[r, P : P + len(y)] = 1
            labels[r, P : P + len(y)] = torch.tensor(y, dtype=torch.long)
    out = {"input_ids": ids, "attention_mask": am, "labels": labels, "group_mask": gm}
    return {k: v.to(device) for k, v in out.items()} if device is not None else out
