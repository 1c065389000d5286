"""Attention for training on CPU: transformers' SDPA entry point, with three CPU-specific choices inside a block.

Inside :func:`training_attention`, a model whose attention is transformers' ``"sdpa"`` runs :func:`cpu_attention`
instead, which differs from transformers' own only on CPU, with a 4-D mask (the padded or prefix-shared batches
of training) and grouped-query attention (several query heads per key/value head, as SmolLM2 and Llama):

* **no copy of the keys and values per query head**: transformers repeats them (``repeat_kv``) whenever a mask is
  given, because CUDA's fast kernels take no mask with grouped heads; torch's CPU flash kernel does take both
  (``enable_gqa``), and is faster so (measured in ``docs/speed.md``: 10.9 → 9.7 ms forward + backward per
  layer in bf16 and 5.2 → 4.3 in fp32 at the demo's shape);
* **short reduced-precision attention with gradients as plain matmuls**: the CPU flash kernel's bf16 backward
  is several times slower than its forward on short sequences (forward + backward 9.2 ms for 2 rows × 9 heads ×
  138 tokens); up to :data:`PLAIN_MAX_KEYS` keys (and :data:`PLAIN_MAX_SCORES` score elements) the attention
  runs as ``softmax(q kᵀ · scale + mask) v`` with the query heads of a group stacked against their shared key
  (5.1 ms there), the softmax in fp32 as transformers' eager attention does it. From ~190 keys on the flash
  kernel is faster (and its memory stays linear in the length), so it is used there;
* **prompt-shared rows in two parts** (:class:`SharedLayout`, rows of :data:`SEGMENTED_MIN_LENGTH` columns and
  more): the prompt block against itself, the completion columns against the whole row, so the masked scores of
  prompt queries against completion keys are not computed; in fp32 the completion columns also skip the other
  completions' keys (:class:`_CompletionAttention`: the prompt part and one causal block per completion, merged by
  log-sum-exp).

Anything else (GPU tensors, dropout, soft-capping, position biases, attention weights asked for, no mask) goes to
transformers' function unchanged, so outside CPU training nothing differs. The block is entered by the training
step only (``exoalign.train.engine``, forward and backward).

Sampling copies (``exoalign.sampling.sampling_copy``) get :func:`_decode_attention` instead, registered under its
own name (:func:`use_decode_attention`): one new token per row against the KV cache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

PLAIN_MAX_KEYS = 160
"""Key lengths up to which a bf16/fp16 attention that needs gradients runs as plain matmuls on CPU (the module
docstring). Forward + backward per layer, 9 query / 3 key-value heads of 64, one thread (ms, plain vs flash):
64 keys 1.6 vs 3.5, 128: 4.7 vs 7.1, 160: 6.6 vs 9.8, 192: 9.7 vs 7.3, 256: 15.1 vs 11.3 (docs/speed.md)."""
PLAIN_MAX_SCORES = 1 << 22
"""…and score elements (batch × heads × queries × keys) up to which it does: the plain form keeps 6 bytes per
element per layer for backward (fp32 softmax, bf16 probabilities); 2 × 9 × 138² ≈ 343 k at the demo's shape."""


def _sdpa() -> Any:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def _plain(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
           scaling: float) -> torch.Tensor:
    """``softmax(q kᵀ · scaling + mask) v`` with the G query heads of a key/value head stacked: ``[B, T, H, D]``."""
    B, H, T, D = query.shape
    KV, L = key.shape[1], key.shape[2]
    G = H // KV
    # Query head h reads key/value head h // G (transformers' repeat_kv order), so heads [kv*G, (kv+1)*G) stack.
    scores = torch.matmul(query.reshape(B, KV, G * T, D), key.transpose(-1, -2)).float().mul_(scaling)
    scores = scores.view(B, KV, G, T, L)
    allowed = mask[:, :, None]  # [B or 1, 1, 1, T, L]
    if allowed.dtype == torch.bool:
        # The most negative float, not -inf: a row with no allowed key (padding) stays finite, as in eager attention.
        scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
    else:
        scores = scores + allowed
    probs = torch.softmax(scores, dim=-1).to(query.dtype).view(B, KV, G * T, L)
    out = torch.matmul(probs, value)  # [B, KV, G*T, D]
    return out.view(B, KV, G, T, D).reshape(B, H, T, D).transpose(1, 2).contiguous()


def cpu_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                  is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention (same arguments, ``[B, T, H, D]`` out), with the CPU choices of the module
    docstring for a 4-D mask and grouped query heads, and prompt-shared rows attended segment by segment."""
    B, H, T, D = query.shape
    KV = key.shape[1]
    if (query.device.type != "cpu" or attention_mask is None or attention_mask.dim() != 4 or dropout
            or H % KV or key.shape[-1] != value.shape[-1] or kwargs.get("position_bias") is not None
            or kwargs.get("softcap") is not None or kwargs.get("output_attentions")):
        return _sdpa()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                       is_causal=is_causal, **kwargs)
    scale = D ** -0.5 if scaling is None else scaling
    layout = getattr(attention_mask, LAYOUT_ATTR, None)
    if layout is not None and layout.serves(query, key, attention_mask):
        return layout.attend(query, key, value, attention_mask, scale), None
    if KV == H:
        return _sdpa()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                       is_causal=is_causal, **kwargs)
    return _attend(query, key, value, attention_mask, scale), None


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
            scale: float, causal: bool = False) -> torch.Tensor:
    """``[B, T, H, D]``: plain matmuls for short reduced-precision attention with gradients, else torch's SDPA
    with the key/value heads shared by their query heads (``enable_gqa``). ``causal``: ``mask`` is plain causal
    (square, nothing padded), which SDPA's causal mode computes without reading the mask, skipping the blocks
    above the diagonal."""
    B, H, T, D = query.shape
    # Under CPU autocast the query arrives in fp32 (the rotary embedding's fp32 tables promote it) and SDPA and the
    # matmuls compute in the autocast dtype: that is the precision that counts.
    low = (torch.bfloat16, torch.float16)
    reduced = query.dtype in low or (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") in low)
    if (reduced and torch.is_grad_enabled() and query.requires_grad
            and key.shape[2] <= PLAIN_MAX_KEYS and B * H * T * key.shape[2] <= PLAIN_MAX_SCORES):
        return _plain(query, key, value, mask, scale)
    if causal and T == key.shape[2]:
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale,
                                                               enable_gqa=key.shape[1] != H)
        return out.transpose(1, 2).contiguous()
    if mask.dtype != torch.bool and mask.dtype != query.dtype:
        mask = mask.to(query.dtype)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale,
                                                           enable_gqa=key.shape[1] != H)
    return out.transpose(1, 2).contiguous()


LAYOUT_ATTR = "_exoalign_shared_layout"
"""Attribute under which :func:`exoalign.packing.shared_prefix_logps` attaches a :class:`SharedLayout` to the 4-D
mask it builds. It travels with the mask object, so the recomputed forward of gradient checkpointing (in the
backward, after the layout's block has ended) finds it too."""
SEGMENTED_MIN_LENGTH = 256
"""Rows from which a prompt-shared batch is attended in two parts (:class:`SharedLayout`). Shorter rows keep one
dense attention: there attention is a small share of the step (and bf16 runs it as plain matmuls up to
:data:`PLAIN_MAX_KEYS` keys); the split was measured only at 576-768 columns (docs/training.md)."""

SPLIT_MAX_RATIO = 0.7
SPLIT_CALL_COST = 4096
"""When the split completion attention is used (:meth:`SharedLayout.split_pays`): its cost in score elements per
row and head, with :data:`SPLIT_CALL_COST` for each flash call's fixed cost (~0.35 ms for a call's forward +
backward against ~7 ns per score element and head, fp32, 2 threads), at most :data:`SPLIT_MAX_RATIO` of the
masked call's. Measured per layer, forward + backward, 9 / 3 heads of 64 (docs/speed.md, "A tenth stop"): prompt 384
and completions of 48, K = 2 / 4 / 8: 1.31 / 1.05 / 0.70 of the masked call's time; ragged completions of 10-60,
K = 8 of 4 rows: 0.75, K = 4 of 8 rows: 1.00; the rule takes K = 8 and those ragged K = 8 rows only."""


class SharedLayout:
    """Attention of a prompt-shared batch (``exoalign.packing``) in two parts, skipping most masked score blocks.

    A row ``[prompt (P columns, left-padded) | completion 1 | … | completion K | padding]`` has a mask in which the
    prompt attends causally to itself and each completion to the whole prompt and causally to itself. One dense
    attention over the row computes every query against every key, ``L²`` score elements, although no prompt
    query may read a completion's key. Here the prompt's queries attend to the prompt's keys only (``P²``, or
    half of it through the flash kernel's causal mode when no prompt is padded) and the completions' queries to
    the whole row (``(L − P)·L``): at K = 8, P = 384, c = 48, 25 % fewer score elements (37 % with the causal
    prompt block), and every operand a slice of the layer's own tensors (no gathers, which cost more than they
    saved). In fp32 the completions' queries read only the prompt and their own completion
    (:class:`_CompletionAttention`, ``(L − P)·(P + c)``); in bf16 both parts go through :func:`_attend`. Same values
    as the dense attention up to the order of the softmax's sums.
    """

    def __init__(self, segments: torch.Tensor, prompt_end: int) -> None:
        self.B, self.L = segments.shape
        self.P = int(prompt_end)
        self.unpadded_prompt = bool((segments[:, : self.P] == 0).all())
        self.segments = segments
        self.mask_cache: dict[tuple, Any] = {}
        self._spans: list[tuple[slice, int, int]] | None = None
        self._split_pays: bool | None = None

    def serves(self, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor) -> bool:
        return (0 < self.P < self.L and self.L >= SEGMENTED_MIN_LENGTH and query.shape[0] == self.B
                and query.shape[2] == self.L and key.shape[2] == self.L
                and tuple(mask.shape) == (self.B, 1, self.L, self.L))

    def _masks(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt block's mask ``[B, 1, P, P]`` and the completion rows' ``[B, 1, L − P, L]``, contiguous
        copies made once per batch (every layer reuses them)."""
        key = (mask.dtype, mask.device)
        if key not in self.mask_cache:
            self.mask_cache[key] = (mask[:, :, : self.P, : self.P].contiguous(), mask[:, :, self.P :].contiguous())
        return self.mask_cache[key]

    def spans(self) -> list[tuple[slice, int, int]]:
        """Each completion's ``(rows, first column, length)``: one entry per completion slot with every row
        (``rows`` = all) where the rows share their layout, else one per row and completion. Made once per batch."""
        if self._spans is None:
            seg = self.segments.cpu()
            per_row = []
            for b in range(self.B):
                cols = seg[b, self.P:]
                row = []
                for k in cols[cols > 0].unique().tolist():
                    at = (cols == k).nonzero().view(-1)
                    row.append((self.P + int(at[0]), int(at.numel())))
                per_row.append(row)
            if all(r == per_row[0] for r in per_row):
                self._spans = [(slice(None), o, n) for o, n in per_row[0]]
            else:
                self._spans = [(slice(b, b + 1), o, n) for b, row in enumerate(per_row) for o, n in row]
        return self._spans

    def split_pays(self) -> bool:
        """Whether :class:`_CompletionAttention` is expected to beat one masked call for the completion columns:
        its score elements (``(L − P)·P`` a row plus ``c²`` per completion) and :data:`SPLIT_CALL_COST` per call
        at most :data:`SPLIT_MAX_RATIO` of the masked call's ``(L − P)·L`` a row. Made once per batch."""
        if self._split_pays is None:
            T, spans = self.L - self.P, self.spans()
            own = sum((self.B if rows == slice(None) else 1) * n * n for rows, _, n in spans)  # c² per completion
            split = self.B * T * self.P + own + SPLIT_CALL_COST * len(spans)
            self._split_pays = split <= SPLIT_MAX_RATIO * self.B * T * self.L
        return self._split_pays

    def prompt_key_mask(self, dtype: torch.dtype) -> torch.Tensor | None:
        """``[B, 1, L − P, P]``: 0 where a completion column may read a prompt column (not padding), the dtype's
        most negative value elsewhere; None when no prompt is padded."""
        if self.unpadded_prompt:
            return None
        key = ("prompt_keys", dtype)
        if key not in self.mask_cache:
            padded = (self.segments[:, None, None, : self.P] != 0)  # (B, 1, 1, P)
            m = torch.zeros(padded.shape, dtype=dtype, device=self.segments.device).masked_fill_(
                padded, torch.finfo(dtype).min)
            self.mask_cache[key] = m.expand(self.B, 1, self.L - self.P, self.P).contiguous()
        return self.mask_cache[key]

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
               scale: float) -> torch.Tensor:
        P = self.P
        prompt_mask, rest_mask = self._masks(mask)
        qp, kp, vp = query[:, :, :P], key[:, :, :P], value[:, :, :P]
        out_p = _attend(qp, kp, vp, prompt_mask, scale, causal=self.unpadded_prompt)  # (B, P, H, D)
        if _split_completions(query) and self.split_pays():
            out_c = _CompletionAttention.apply(query[:, :, P:], key, value, self, scale)  # (B, H, L - P, D)
            out_c = out_c.transpose(1, 2).contiguous()
        else:
            out_c = _attend(query[:, :, P:], key, value, rest_mask, scale)  # (B, L - P, H, D)
        return torch.cat([out_p, out_c], 1)


def _flash_ops() -> tuple[Any, Any] | None:
    ops = torch.ops.aten
    if hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu") and hasattr(
            ops, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        return ops._scaled_dot_product_flash_attention_for_cpu, ops._scaled_dot_product_flash_attention_for_cpu_backward
    return None


def _split_completions(query: torch.Tensor) -> bool:
    """Whether :class:`_CompletionAttention` serves the completion columns: fp32 outside reduced-precision
    autocast (bf16 keeps one masked attention: its flash backward is slow on the short per-completion blocks),
    with torch's CPU flash kernel at hand."""
    return (query.dtype == torch.float32 and not torch.is_autocast_enabled("cpu") and _flash_ops() is not None)


class _CompletionAttention(torch.autograd.Function):
    """The completion columns of prompt-shared rows ``[B, H, L − P, D]`` against the prompt and their own
    completion, without the masked score blocks of the other completions.

    One flash call attends every completion column to the prompt's keys; one causal flash call per completion
    attends it to its own keys; the two partial softmaxes merge through their log-sum-exps
    (``o = Σ_s exp(lse_s − lse) o_s``, ``lse = log Σ_s exp(lse_s)``). The backward runs the flash kernel's own
    backward on each part with the merged output and log-sum-exp, which is the exact gradient of the merged
    softmax (each part's probabilities are ``exp(s − lse)``, and ``Σ dO ⊙ O`` is the merged row's). Padding
    columns read the prompt only (the dense mask lets them read themselves): no real column reads them, so
    nothing that is predicted changes. At K = 8, P = 384, completions of 48: the completions' score elements fall
    from ``(L − P)·L`` to ``(L − P)·(P + 48)``.
    """

    @staticmethod
    def forward(ctx, qc, key, value, layout, scale):
        fwd, _ = _flash_ops()
        P = layout.P
        mask = layout.prompt_key_mask(qc.dtype)
        out_a, lse_a = fwd(qc, key[:, :, :P], value[:, :, :P], 0.0, False, attn_mask=mask, scale=scale)
        out_b = torch.zeros_like(out_a)
        lse_b = torch.full_like(lse_a, float("-inf"))
        for rows, o, n in layout.spans():
            c = slice(o - P, o - P + n)
            out_b[rows, :, c], lse_b[rows, :, c] = fwd(qc[rows, :, c], key[rows, :, o : o + n],
                                                       value[rows, :, o : o + n], 0.0, True, scale=scale)
        lse = torch.logaddexp(lse_a, lse_b)  # (B, H, T); every column has a prompt key, so finite
        out = out_a.mul_((lse_a - lse).exp_().unsqueeze(-1)).add_(out_b.mul_((lse_b - lse).exp_().unsqueeze(-1)))
        ctx.save_for_backward(qc, key, value, out, lse)
        ctx.layout, ctx.scale, ctx.mask = layout, scale, mask
        return out

    @staticmethod
    def backward(ctx, grad_out):
        _, bwd = _flash_ops()
        qc, key, value, out, lse = ctx.saved_tensors
        layout, scale, P = ctx.layout, ctx.scale, ctx.layout.P
        grad_out = grad_out.contiguous()
        dq, dk_p, dv_p = bwd(grad_out, qc, key[:, :, :P], value[:, :, :P], out, lse, 0.0, False,
                             attn_mask=ctx.mask, scale=scale)
        dk, dv = torch.zeros_like(key), torch.zeros_like(value)
        dk[:, :, :P], dv[:, :, :P] = dk_p, dv_p
        for rows, o, n in layout.spans():
            c = slice(o - P, o - P + n)
            gq, gk, gv = bwd(grad_out[rows, :, c], qc[rows, :, c], key[rows, :, o : o + n],
                             value[rows, :, o : o + n], out[rows, :, c], lse[rows, :, c], 0.0, True, scale=scale)
            dq[rows, :, c] += gq
            dk[rows, :, o : o + n] += gk
            dv[rows, :, o : o + n] += gv
        return dq, dk, dv, None, None


@contextlib.contextmanager
def training_attention(enabled: bool = True) -> Iterator[None]:
    """Inside the block, transformers' ``"sdpa"`` attention is :func:`cpu_attention` (for every model of the
    process: the entry is looked up at each forward), and the rotary embeddings of Llama-form models run as one
    autograd function (:func:`exoalign.lean.fast_rotary`). Restored on exit, whatever was there before."""
    if not enabled:
        yield
        return
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from .lean import fast_rotary

    local = ALL_ATTENTION_FUNCTIONS._local_mapping
    had, before = "sdpa" in local, local.get("sdpa")
    ALL_ATTENTION_FUNCTIONS["sdpa"] = cpu_attention
    try:
        with fast_rotary():
            yield
    finally:
        if had:
            local["sdpa"] = before
        else:
            local.pop("sdpa", None)


DECODE_ATTENTION = "exoalign_decode"


def _decode_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention of one new token per row (decoding) as two matmuls per key/value head, the query heads that share
    it stacked (no copy of the cache per query head); anything else goes to transformers' SDPA. On CPU in bf16,
    SDPA's flash kernel takes 3-7x longer on this shape (``docs/speed.md``). Softmax in fp32, as eager attention."""
    R, H, q, D = query.shape  # (rows, heads, 1, head dim)
    KV = key.shape[1]
    if q != 1 or dropout or H % KV or (attention_mask is not None and attention_mask.dim() != 4):
        return _sdpa()(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    w = torch.matmul(query.reshape(R, KV, H // KV, D), key.transpose(-1, -2)) * scaling  # (R, KV, G, L)
    if attention_mask is not None:  # (R or 1, 1, 1, L): True / 0 where a row may attend
        w = w.masked_fill(~attention_mask, float("-inf")) if attention_mask.dtype == torch.bool else w + attention_mask
    p = torch.softmax(w, -1, dtype=torch.float32).to(query.dtype)  # (R, KV, G, L)
    return torch.matmul(p, value).reshape(R, 1, H, D), None  # (R, 1, H, D) as SDPA returns it


def uses_decode_attention(model: torch.nn.Module) -> bool:
    """``model`` runs :func:`_decode_attention` (a sampling copy switched by :func:`use_decode_attention`)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == DECODE_ATTENTION


def use_decode_attention(model: torch.nn.Module) -> None:
    """Point a sampling copy (ours, on CPU, SDPA attention) at :func:`_decode_attention`. Not done on the caller's
    own model, whose fp32 samples must stay the pre-change tokens bit for bit (another attention kernel rounds
    differently)."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or next(model.parameters()).device.type != "cpu":
        return
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(DECODE_ATTENTION, _decode_attention)
    AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)
    try:
        model.set_attn_implementation(DECODE_ATTENTION)
    except (ValueError, KeyError, AttributeError):  # a model that cannot switch keeps SDPA
        pass
