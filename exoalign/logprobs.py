"""Sequence log-probabilities of completions, computed without the full ``[B, T, V]`` logits or log-softmax.

Layout of a batch (see ``exoalign.data``): prompts are left-padded and completions right-padded, so every
completion starts at the same column ``P`` of the batch::

    [pad pad p p p | c c c c pad]      labels = -100 everywhere except the completion tokens
    [  p p p p p   | c c pad pad pad]

Three things keep this cheap:

* The model projects onto the vocabulary only the hidden states that predict a completion token: a boolean
  ``logits_to_keep`` mask (transformers ≥ 5) gives ``[n_tokens, V]`` logits and nothing for prompt or padding
  positions. Models without it fall back to the last ``T − P + 1`` columns.
* ``log p(target) = logit[target] − logsumexp(logits)`` is computed chunk by chunk by :class:`_TokenLogps`, an
  autograd function that keeps only the logits (which exist anyway) and one float per token, and writes the
  gradient ``onehot − softmax`` straight into one buffer: no ``[N, V]`` log-softmax, no fp32 copy of bf16 logits.
* Columns that are padding in every row are dropped before the forward pass.
* With the chunked head (:func:`chunked_head_logps`, on where it wins: see :data:`HEAD_MODE`) even the
  ``[n_tokens, V]`` logits never exist: the model returns hidden states and :class:`_HeadLogps` projects
  ``chunk`` rows at a time, recomputing each chunk's logits in backward.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Callable, Iterator

import torch

from . import gemm

IGNORE = -100
#: Elements of one fp32 working block in :func:`token_logps` (32 MiB): bounds the transient memory per chunk.
_BLOCK_ELEMS = 1 << 23


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 on the first real token of each (left-padded) row. ``[B, T]``."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)


def _chunks(n: int, vocab: int, chunk: int | None) -> Iterator[tuple[int, int]]:
    step = chunk if chunk is not None else max(1, _BLOCK_ELEMS // max(vocab, 1))
    for start in range(0, n, step):
        yield start, min(start + step, n)


_LSE_ROWS = 16
"""Rows per call of :func:`_row_logsumexp`'s fused kernel: 16 rows of a 49 152-token vocabulary are 3 MiB of fp32,
which stay in cache between the kernel's passes."""


def _row_logsumexp(block: torch.Tensor) -> torch.Tensor:
    """``logsumexp(block, -1)`` ``[rows]`` for fp32 ``[rows, V]`` on CPU through torch's fused log-softmax kernel
    (its max and sum-of-exp passes over a row stay in cache), ``lse = max(x) − max(log_softmax(x))``; elsewhere
    ``torch.logsumexp``. At the throughput benchmark's 1 016 × 49 152 logits: 68-84 → 37-38 ms (docs/speed.md)."""
    if block.device.type != "cpu" or block.dtype != torch.float32 or block.dim() != 2:
        return torch.logsumexp(block, dim=-1)
    out = torch.empty(block.shape[0], dtype=torch.float32)
    for s in range(0, block.shape[0], _LSE_ROWS):
        b = block[s : s + _LSE_ROWS]
        ls = torch.log_softmax(b, -1)  # (r, V) x − max − log Σ exp(x − max); its largest entry is exactly −log Σ
        top = b.amax(-1)  # (r,)
        out[s : s + _LSE_ROWS] = torch.where(top == float("-inf"), top, top - ls.amax(-1))  # a row of -inf: -inf
    return out


class _TokenLogps(torch.autograd.Function):
    """``log softmax(logits[index] / τ)[target]`` per token, with a hand-written, chunked backward.

    Autograd through ``gather − logsumexp`` would allocate two ``[N, V]`` gradients (one per branch) and, for
    half-precision logits, keep an fp32 copy of them for backward. Here the forward keeps the logits and the
    per-row ``logsumexp`` only, and the backward writes ``g · (onehot(target) − softmax) / τ`` into a single
    buffer of the logits' dtype, one chunk of rows at a time. ``index`` (optional, ``[n]``) lets several tokens
    read the same logits row (prompt sharing: the prompt's last position predicts the first token of each of
    the K completions) without copying rows.
    """

    @staticmethod
    def forward(ctx, logits, targets, index, temperature: float, chunk: int | None):
        m, vocab = logits.shape
        lse = torch.empty(m, dtype=torch.float32, device=logits.device)  # (m,)
        for s, e in _chunks(m, vocab, chunk):
            block = logits[s:e].float()  # (rows, V); a view when the logits are already fp32
            if temperature != 1.0:
                block = block / temperature
            lse[s:e] = _row_logsumexp(block)
        rows = index if index is not None else torch.arange(m, device=logits.device)  # (n,)
        picked = logits[rows, targets].float() / temperature  # (n,)
        ctx.save_for_backward(logits, targets, rows, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.reuse = _GRAD_IN_PLACE and _reusable(logits)
        return picked - lse[rows]

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, targets, rows, lse = ctx.saved_tensors
        tau = ctx.temperature
        g = grad_out.float()  # (n,)
        # Total upstream gradient per logits row (a row read by several tokens sums theirs).
        g_row = torch.zeros_like(lse).index_add_(0, rows, g)  # (m,)
        # (m, V): the only full-size buffer of the backward; the logits' own storage when nothing else needs it.
        grad = logits if ctx.reuse else torch.empty_like(logits)
        for s, e in _chunks(logits.shape[0], logits.shape[1], ctx.chunk):
            block = logits[s:e].float()
            if tau != 1.0:
                block = block / tau
            # d logp / dx = onehot − softmax with softmax = exp(x − lse); the onehot part is added below.
            if grad.dtype == torch.float32:  # straight into the buffer (the logits' own rows when reused): no copy
                out = torch.sub(block, lse[s:e, None], out=grad[s:e])
                out.exp_().mul_(-g_row[s:e, None])
            else:  # half-precision logits: the softmax in fp32, rounded once on the way in
                grad[s:e] = (block - lse[s:e, None]).exp_().mul_(-g_row[s:e, None])
        grad.index_put_((rows, targets), g.to(grad.dtype), accumulate=True)
        if tau != 1.0:
            grad.div_(tau)  # chain rule through x = logits / τ
        return grad, None, None, None, None


#: Whether :class:`_TokenLogps` may write its gradient into the logits (see :func:`logits_grad_in_place`).
_GRAD_IN_PLACE = False


@contextlib.contextmanager
def logits_grad_in_place(enabled: bool = True) -> Iterator[None]:
    """Log-probs computed inside the block write their backward's gradient into the logits' own storage.

    Saves one ``[tokens, vocab]`` buffer per step, but the graph can then be differentiated only once: a second
    ``backward`` through the same logits (``retain_graph=True``) raises autograd's in-place error. The training
    loop (one backward per forward) turns it on; everything else keeps the default, off.
    """
    global _GRAD_IN_PLACE
    was, _GRAD_IN_PLACE = _GRAD_IN_PLACE, enabled
    try:
        yield
    finally:
        _GRAD_IN_PLACE = was


#: Autograd nodes whose backward does not read their output (a tensor they made may be overwritten), and the
#: reshapes that may stand between such a node and the logits.
_OUTPUT_FREE = ("MmBackward0", "AddmmBackward0", "BmmBackward0", "ToCopyBackward0", "IndexBackward0",
                "_OneDNNLinearBackward")  # exoalign.gemm's linear keeps its input and weight, not its output
_RESHAPES = ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0")


def _reusable(logits: torch.Tensor) -> bool:
    """Whether backward may write the gradient into ``logits``' own storage (saving one ``[m, V]`` buffer).

    True for logits that come straight out of a linear layer, a boolean index or a dtype cast (through at most
    a few reshapes): none of those reads its output in backward. Any other producer (soft-capping, scaling, a
    user hook) might keep the tensor for its own backward, so the gradient gets a buffer of its own there. (A
    producer that did keep it would make autograd raise, never compute a wrong gradient: the in-place write
    bumps the tensor's version counter.)
    """
    fn = logits.grad_fn
    for _ in range(4):
        if fn is None:
            return False
        name = type(fn).__name__
        if name in _OUTPUT_FREE:
            return True
        if name not in _RESHAPES:
            return False
        nxt = [f for f, _ in fn.next_functions if f is not None]
        fn = nxt[0] if len(nxt) == 1 else None
    return False


class _HeadLogps(torch.autograd.Function):
    """``log softmax(h W^T / τ)[target]`` per token from hidden states ``h`` ``[m, H]`` and the head ``W`` ``[V, H]``.

    No ``[m, V]`` tensor is kept: the forward projects ``chunk`` rows at a time and keeps one ``logsumexp`` per
    row; the backward recomputes each chunk's logits and, with ``G = −g_row · softmax / τ`` ``[chunk, V]``,
    accumulates ``dh = G W`` and ``dW += G^T h``. The one-hot part ``g · (W[t], h)/τ`` is added by index ops.
    One extra head matmul per step buys the memory of the logits and their gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, index, temperature: float, chunk: int, dtype):
        m, vocab = hidden.shape[0], weight.shape[0]
        h, w = hidden.to(dtype), weight.to(dtype)  # views when already of the compute dtype
        b = bias.to(dtype) if bias is not None else None
        lse = torch.empty(m, dtype=torch.float32, device=hidden.device)  # (m,)
        for s, e in _chunks(m, vocab, chunk):
            block = gemm.linear(h[s:e], w, b).float()  # (rows, V); no autograd in here
            if temperature != 1.0:
                block = block / temperature
            lse[s:e] = _row_logsumexp(block)
        rows = index if index is not None else torch.arange(m, device=hidden.device)  # (n,)
        picked = (h[rows] * w[targets]).sum(-1, dtype=torch.float32)  # (n,) the target logits
        if b is not None:
            picked = picked + b[targets].float()
        ctx.save_for_backward(h, w, b, targets, rows, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return picked / temperature - lse[rows]

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        h, w, b, targets, rows, lse = ctx.saved_tensors
        tau, (h_dtype, w_dtype, b_dtype) = ctx.temperature, ctx.dtypes
        m, vocab = h.shape[0], w.shape[0]
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        g = grad_out.float() / tau  # (n,)
        g_row = torch.zeros_like(lse).index_add_(0, rows, g)  # (m,) a row read by several tokens sums theirs
        gh = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if need_h else None  # (m, H)
        gw = None  # (V, H) fp32: the first chunk's product, then accumulated in place (no zero-filled buffer)
        gb = torch.zeros(vocab, dtype=torch.float32, device=w.device) if need_b else None  # (V,)
        for s, e in _chunks(m, vocab, ctx.chunk):
            block = gemm.linear(h[s:e], w, b).float()  # (rows, V); no autograd in here
            # G = −g_row · softmax(x / τ), softmax = exp(x/τ − lse); the one-hot part is added below.
            block = (block.div_(tau) if tau != 1.0 else block).sub_(lse[s:e, None]).exp_().mul_(-g_row[s:e, None])
            if gb is not None:
                gb += block.sum(0)
            G = block.to(h.dtype)
            if gh is not None:
                gh[s:e] = (G @ w).float()  # (rows, H)
            if need_w:
                if gw is None:
                    gw = (G.t() @ h[s:e]).float()  # (V, H); a fresh buffer in fp32, converted once in bf16
                elif G.dtype == torch.float32:
                    gw.addmm_(G.t(), h[s:e])  # (V, H), in place
                else:
                    gw += (G.t() @ h[s:e]).float()
        # The one-hot part: d logp / dx_target = 1 (times g / τ).
        if gh is not None:
            gh.index_add_(0, rows, w[targets].float() * g[:, None])
        if gw is not None:
            gw.index_add_(0, targets, h[rows].float() * g[:, None])
        if gb is not None:
            gb.index_add_(0, targets, g)
        return (
            gh.to(h_dtype) if gh is not None else None,
            gw.to(w_dtype) if gw is not None else None,
            gb.to(b_dtype) if gb is not None else None,
            None, None, None, None, None,
        )


def head_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    index: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk: int | None = None,
) -> torch.Tensor:
    """``log softmax((h W^T + b) / τ)[target]`` ``[n]`` fp32 from hidden states ``[m, H]``, never holding ``[m, V]``.

    ``index`` ``[n]`` (optional) names the hidden row that predicts each target (rows may repeat). Under
    autocast the matmuls run in the autocast dtype, as the model's own head would; ``chunk`` rows are projected at
    a time (default: as many as fit 32 MiB of fp32 logits). Targets of ``-100`` are read as token 0.
    """
    n = index.numel() if index is not None else hidden.shape[0]
    if n == 0:
        return hidden.new_zeros(0, dtype=torch.float32) + (hidden.sum() + weight.sum()) * 0
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    step = chunk if chunk is not None else max(1, _BLOCK_ELEMS // max(weight.shape[0], 1))
    with torch.autocast(device_type, enabled=False):
        return _HeadLogps.apply(hidden, weight, bias, targets.clamp(min=0), index, float(temperature), step, dtype)


def token_logps(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, chunk: int | None = None
) -> torch.Tensor:
    """``log softmax(logits / temperature)[target]`` for each row of ``logits`` ``[N, V]``; returns ``[N]`` fp32.

    Equivalent to ``logits.log_softmax(-1).gather(-1, targets)`` but never holds an ``[N, V]`` log-softmax:
    ``chunk`` rows at a time (default: as many as fit 32 MiB of fp32), keeping one ``logsumexp`` per row.
    Targets of ``-100`` are read as token 0 (the caller ignores those rows).
    """
    if logits.shape[0] == 0:
        return logits.new_zeros(0, dtype=torch.float32) + logits.sum() * 0  # keeps the graph connected
    return _TokenLogps.apply(logits, targets.clamp(min=0), None, float(temperature), chunk)


def gathered_token_logps(
    logits: torch.Tensor, index: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Like :func:`token_logps` for tokens ``[n]`` predicted by rows ``index`` ``[n]`` of ``logits`` ``[m, V]``.

    Rows may repeat (several tokens predicted from one position) without being copied.
    """
    if index.numel() == 0:
        return logits.new_zeros(0, dtype=torch.float32) + logits.sum() * 0
    return _TokenLogps.apply(logits, targets.clamp(min=0), index, float(temperature), None)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model under DDP / accelerate (``.module``), ``torch.compile`` (``._orig_mod``) and PEFT wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            break
        model = inner
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _accepts(model: torch.nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(unwrap_model(model).forward).parameters
    except (TypeError, ValueError):
        return False


def compact_logits_supported(model: torch.nn.Module) -> bool:
    """Whether ``model`` takes a boolean ``[B, T]`` ``logits_to_keep`` and returns ``[n_true, V]`` logits.

    Models of transformers ≥ 5 slice their hidden states with ``slice_logits_to_keep``, which understands a
    boolean mask; older or custom models only know an int (keep the last n positions).
    """
    inner = unwrap_model(model)
    if not _accepts(inner, "logits_to_keep"):
        return False
    module = inspect.getmodule(type(inner).forward)
    return module is not None and hasattr(module, "slice_logits_to_keep")


def completion_logits(model: torch.nn.Module, predict: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
    """Logits ``[n, V]`` at the positions where ``predict`` ``[B, T]`` is True, in row-major order.

    Models that only know an int ``logits_to_keep`` compute every column from the first one where ``predict``
    is True, and the True positions are picked afterwards. ``inputs`` go to the model as they are
    (``input_ids``, ``attention_mask``, ``position_ids``).
    """
    T = predict.shape[1]
    if compact_logits_supported(model):
        return model(**inputs, use_cache=False, logits_to_keep=predict).logits  # (n, V)
    any_col = predict.any(0)
    first_col = int(any_col.float().argmax()) if bool(any_col.any()) else T - 1
    if _accepts(model, "logits_to_keep"):
        logits = model(**inputs, use_cache=False, logits_to_keep=T - first_col).logits  # (B, T - first, V)
    else:
        logits = model(**inputs, use_cache=False).logits[:, first_col:]
    return logits[predict[:, first_col:]]  # (n, V)


#: Where the chunked head (:func:`head_token_logps`) replaces the model's own head: ``"auto"`` where it wins
#: (docs/speed.md), ``"on"`` wherever the model allows it, ``"off"`` never. Set by ``train.chunked_head``.
HEAD_MODE = "auto"
#: ``auto`` projects in chunks when the full logits would exceed this many elements (with gradients).
_AUTO_MIN_ELEMS = 1 << 26


def structure_key(inner: torch.nn.Module) -> tuple | None:
    """What a structural probe's verdict depends on: the class, the config (and attention implementation), the
    parameters' dtype and device, and which module classes the model is built of (a LoRA layer, a subclass with its
    own forward). Two models with the same key get the same verdict, so a process that loads the same architecture
    again (the demo's workers, one run after another) probes it once: each probe costs four forwards, ~0.4 s on a
    135M model, however small its input. None when the model has no config to read."""
    config = getattr(inner, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        return None
    try:
        param = next(inner.parameters())
        return (type(inner), config.to_json_string(use_diff=False), getattr(config, "_attn_implementation", None),
                param.dtype, param.device.type, frozenset(_structural_type(m) for m in inner.modules()))
    except Exception:  # a config that cannot be serialised: probe this model itself
        return None


def _structural_type(module: torch.nn.Module) -> type:
    """A module's class for :func:`structure_key`: a lean-activation subclass (``exoalign.lean``, probed equal to
    its base class's forward) counts as its base, so patching a model does not make its probes run again."""
    return getattr(type(module), "_lean_base", type(module))


class ProbeCache:
    """A structural probe's verdicts: per model object (and attention implementation, which a model can switch),
    and per :func:`structure_key`, so another model of the same architecture is not probed again."""

    def __init__(self) -> None:
        self.by_model: weakref.WeakKeyDictionary[torch.nn.Module, tuple[str | None, bool]] = weakref.WeakKeyDictionary()
        self.by_key: dict[tuple, bool] = {}

    def verdict(self, inner: torch.nn.Module, probe: Callable[[], bool]) -> bool:
        """The cached verdict for ``inner``, else ``probe()`` (remembered both ways)."""
        impl = getattr(getattr(inner, "config", None), "_attn_implementation", None)
        hit = self.by_model.get(inner)
        if hit is not None and hit[0] == impl:
            return hit[1]
        key = structure_key(inner)
        ok = self.by_key[key] if key is not None and key in self.by_key else bool(probe())
        self.by_model[inner] = (impl, ok)
        if key is not None:
            self.by_key[key] = ok
        return ok


_HEAD_PROBES = ProbeCache()


@contextlib.contextmanager
def probing(inner: torch.nn.Module) -> Iterator[None]:
    """A one-off numerical probe of ``inner``: eval mode and no grad for the duration, the training flag restored.

    The probes ask structural questions (is the mask honoured, is the head a plain linear) and run once per
    architecture per process (:func:`structure_key`). They run in whatever precision the caller's context sets
    (under accelerate's bf16 autocast at a run's first step). Running them in fp32 with accelerate's wrapper lifted
    was tried: 0.4 s instead of ~0.7 s alone, but in every full demo run it went with a first ``exo-rw`` job whose
    first three steps took 5.5-7.3, 2.3-2.5 and 1.5-1.8 s instead of 2.4, 1.5 and 1.4 s (cause not found;
    docs/speed.md), so it was reverted."""
    was_training = inner.training
    inner.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        inner.train(was_training)


#: Config fields of models whose logits are not plain ``head(hidden)`` (soft-capping, scaling).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


@contextlib.contextmanager
def head_mode(mode: str) -> Iterator[None]:
    """Use the chunked head ``"auto"``/``"on"``/``"off"`` inside the block (see :data:`HEAD_MODE`)."""
    global HEAD_MODE
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"unknown head mode {mode!r}; use auto, on or off")
    was, HEAD_MODE = HEAD_MODE, mode
    try:
        yield
    finally:
        HEAD_MODE = was


def _head_name(inner: torch.nn.Module) -> str | None:
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear:  # a LoRA-wrapped or custom head: its weight is not the whole story
        return None
    return next((name for name, child in inner.named_children() if child is head), None)


@contextlib.contextmanager
def _hidden_out(inner: torch.nn.Module, name: str) -> Iterator[torch.nn.Linear]:
    """The model returns its final hidden states as ``.logits`` inside the block (its head is an identity)."""
    head = getattr(inner, name)
    setattr(inner, name, torch.nn.Identity())
    try:
        yield head
    finally:
        setattr(inner, name, head)


def _sharded(model: torch.nn.Module, weight: torch.Tensor) -> bool:
    """FSDP (1 or 2) or DeepSpeed ZeRO-3 hold the head's weight in pieces: it cannot be used outside forward."""
    if any("FullyShardedDataParallel" in type(m).__name__ for m in (model, unwrap_model(model))):
        return True
    return type(weight.data) is not torch.Tensor or weight.numel() == 0 or hasattr(weight, "ds_id")


def chunked_head_supported(model: torch.nn.Module) -> bool:
    """Whether ``model``'s logits are ``lm_head(hidden)`` of a plain ``nn.Linear`` (config checks + one probe)."""
    inner = unwrap_model(model)
    return _HEAD_PROBES.verdict(inner, lambda: _head_probe(inner))


def _head_probe(inner: torch.nn.Module) -> bool:
    name = _head_name(inner)
    config = getattr(inner, "config", None)
    ok = name is not None and compact_logits_supported(inner)
    ok = ok and not any(getattr(config, f, None) not in (None, 1, 1.0) for f in _LOGIT_TRANSFORMS)
    if not ok:
        return False
    ids = torch.arange(1, 4, device=inner.get_output_embeddings().weight.device)[None] % inner.config.vocab_size
    keep = torch.ones_like(ids, dtype=torch.bool)
    try:
        with probing(inner):
            plain = inner(input_ids=ids, use_cache=False, logits_to_keep=keep).logits.float()
            with _hidden_out(inner, name) as head:
                hidden = inner(input_ids=ids, use_cache=False, logits_to_keep=keep).logits
            return hidden.shape[-1] == head.in_features and torch.allclose(
                torch.nn.functional.linear(hidden, head.weight, head.bias).float(), plain, rtol=1e-4, atol=1e-4
            )
    except Exception:  # any failure: this model keeps its own head
        return False


def _use_chunked(model: torch.nn.Module, n_rows: int) -> bool:
    if HEAD_MODE == "off" or not chunked_head_supported(model):
        return False
    head = unwrap_model(model).get_output_embeddings()
    if _sharded(model, head.weight):
        return False
    # auto: without gradients chunking only saves work; with them it costs one more head matmul, which pays
    # for itself only when the logits are large (docs/speed.md).
    return HEAD_MODE == "on" or not torch.is_grad_enabled() or n_rows * head.out_features >= _AUTO_MIN_ELEMS


def completion_token_logps(
    model: torch.nn.Module,
    predict: torch.Tensor,
    targets: torch.Tensor,
    *,
    index: torch.Tensor | None = None,
    temperature: float = 1.0,
    **inputs: torch.Tensor,
) -> torch.Tensor:
    """Log-probs ``[n]`` of ``targets`` predicted at the True positions of ``predict`` ``[B, T]`` (row-major).

    ``index`` ``[n]`` names the predicting position of each target among the True ones (default: one each).
    Uses the chunked head (:func:`head_token_logps`) or the model's logits (:func:`completion_logits`).
    """
    n_rows = int(predict.sum())
    if _use_chunked(model, n_rows):
        inner = unwrap_model(model)
        with _hidden_out(inner, _head_name(inner)) as head:
            hidden = completion_logits(model, predict, **inputs)  # (n_rows, H)
        return head_token_logps(hidden, head.weight, targets, bias=head.bias, index=index, temperature=temperature)
    logits = completion_logits(model, predict, **inputs)  # (n_rows, V)
    if index is None:
        return token_logps(logits, targets, temperature)
    return gathered_token_logps(logits, index, targets, temperature)


def _trim(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, position_ids):
    """Drop the columns that are padding in every row (a caller's fixed-length padding costs nothing then)."""
    used = attention_mask.bool().any(0)  # (T,)
    if bool(used.all()) or not bool(used.any()):
        return input_ids, attention_mask, labels, position_ids
    cols = used.nonzero().squeeze(-1)
    lo, hi = int(cols[0]), int(cols[-1]) + 1
    pos = position_ids[:, lo:hi] if position_ids is not None else None
    return input_ids[:, lo:hi], attention_mask[:, lo:hi], labels[:, lo:hi], pos


def sequence_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs ``[N]`` (fp32) and completion lengths ``[N]`` for a batch of rows ``[N, T]``.

    ``labels`` holds the token ids whose log-prob is summed and ``-100`` elsewhere (prompt and padding). The
    logits are divided by ``temperature`` first (the sampling temperature, as in the EXO authors' code).
    """
    lengths = (labels != IGNORE).sum(-1)  # (N,)
    input_ids, attention_mask, labels, position_ids = _trim(input_ids, attention_mask, labels, position_ids)
    N = input_ids.shape[0]
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    # The hidden state at column t predicts the token at t + 1: keep the columns whose next token is labelled.
    nxt = labels[:, 1:]  # (N, T - 1)
    keep = nxt != IGNORE
    predict = torch.cat([keep, keep.new_zeros(N, 1)], dim=1)  # (N, T)
    lp = completion_token_logps(
        model, predict, nxt[keep], temperature=temperature,
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
    )  # (n_tokens,)
    rows = keep.nonzero()[:, 0]  # (n_tokens,) row of each kept token, in the same row-major order
    sums = torch.zeros(N, dtype=lp.dtype, device=lp.device).index_add(0, rows, lp)  # (N,)
    return sums, lengths


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to bf16/fp16 on ``device`` for ``precision`` in ``bf16``/``fp16``; a no-op for fp32.

    Log-probs stay fp32 under it: :func:`token_logps` upcasts each chunk and the losses upcast their inputs.
    """
    dtype = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if precision in ("fp32", "float32", "no", "none", None):
        return contextlib.nullcontext()
    if precision not in dtype:
        raise ValueError(f"unknown precision {precision!r}; use fp32, bf16 or fp16")
    device_type = torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=dtype[precision])
