"""Sampling completions from a causal LM, reproducibly, with Hugging Face ``generate`` or vLLM.

The one sampler of the package: ``exoalign sample``, ``exoalign eval``, the demo and the online rounds all draw
through it. Two properties matter to the rest of the pipeline:

* **Per-completion seeds.** Completion ``j`` of prompt number ``i`` is drawn with its own random stream,
  seeded by ``completion_seed(seed, i, j)``. A completion therefore does not depend on which other prompts
  share its batch, on the batch size, or on where an interrupted run was resumed.
  With ``generate`` this is done by :class:`SeededSampler`, a logits processor that draws the next token
  by the Gumbel-max trick: ``y_t = argmax_v (log p_v + g_v)`` with ``g_v = −log(−log u_v)`` and ``u_v``
  uniform from the row's own ``torch.Generator``. That is an exact sample from ``softmax(log p)`` (the
  temperature / top-k / top-p warped distribution), and it leaves ``generate`` in greedy mode, so the global
  RNG is never used. vLLM takes a seed per request (``SamplingParams(seed=…)``).
* **Token ids are kept.** Each :class:`Completion` carries the sampled ids (with the EOS token when the model
  stopped), so log-probs for the KL estimators are computed on exactly the sampled sequence rather than on a
  re-tokenisation of the decoded text.

"""

from __future__ import annotations

import functools
import hashlib
import math
import threading
import types
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from .attention import use_decode_attention, uses_decode_attention
from .config import require
from .data import load_rows
from .errors import ConfigError
from .gemm import ModuleForward
from .hardware import fast_bf16, warn_slow_bf16
from .models import load_causal_lm
from .zoo import resolve_model_path


# ------------------------------------------------------------------------------------------ settings
@dataclass
class SamplingSettings:
    """Sampling settings shared by ``exoalign sample`` and ``exoalign eval`` (flat keys in both configs)."""

    temperature: float = 1.0
    """Sampling temperature (> 0). The EXO paper samples at 0.8; KL in ``eval`` is measured at this temperature."""
    top_k: int = 0
    """Keep only the k most likely tokens at each step (0 = no top-k filter)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens with this much probability (1.0 = off)."""
    max_new_tokens: int = 64
    """Maximum number of tokens generated per completion."""
    min_new_tokens: int = 0
    """Forbid EOS for this many first tokens (1 avoids empty completions; 0 samples the model unchanged)."""
    max_prompt_length: int = 512
    """Prompts longer than this many tokens are truncated from the left (their beginning is dropped)."""
    seed: int = 0
    """Seed of the per-completion random streams: completion j of prompt i depends only on (seed, i, j)."""
    batch_size: int = 16
    """Prompts per generation batch (each expands to k rows); also the unit written to disk on resume."""
    backend: Literal["auto", "hf", "vllm"] = "auto"
    """Sampler: 'hf' (transformers generate), 'vllm' (needs vllm and a GPU), 'auto' (vllm when usable)."""
    gpu_memory_utilization: float = 0.85
    """vLLM only: fraction of the GPU's memory the vLLM engine may take."""
    kv_cache: Literal["dynamic", "static"] = "dynamic"
    """HF only: the KV cache of generate (static = preallocated; not faster on CPU, docs/speed.md). Same distribution."""
    sample_dtype: Literal["model", "float32", "bfloat16", "float16"] = "model"
    """HF only: weights dtype for sampling: model (as loaded) or a converted copy (bfloat16: faster on CPUs with bf16
    units; samples the bf16 model, and the reported log-probs are that model's). Training keeps its own weights."""
    shared_prefill: bool = True
    """HF only: run each prompt once and copy its KV cache to its K rows (same samples; false = the pre-change path)."""

    def check_sampling(self) -> None:
        """Validate the sampling fields (called from the owning config's ``__post_init__``)."""
        require(self.temperature > 0, "temperature", f"must be > 0 (got {self.temperature})", "use e.g. 0.8 or 1.0")
        require(self.top_k >= 0, "top_k", f"must be >= 0 (got {self.top_k})", "use 0 to turn top-k off")
        require(0 < self.top_p <= 1, "top_p", f"must be in (0, 1] (got {self.top_p})", "use 1.0 to turn top-p off")
        require(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1", "use e.g. 64")
        require(
            0 <= self.min_new_tokens <= self.max_new_tokens,
            "min_new_tokens",
            "must be between 0 and max_new_tokens",
            "use 0 or 1",
        )
        require(self.max_prompt_length >= 1, "max_prompt_length", "must be >= 1", "use e.g. 512")
        require(self.batch_size >= 1, "batch_size", "must be >= 1", "use e.g. 16")
        require(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", "must be in (0, 1]", "use e.g. 0.85")
        require(self.sample_dtype in ("model", "float32", "bfloat16", "float16"), "sample_dtype",
                f"unknown {self.sample_dtype!r}", "use model, float32, bfloat16 or float16")

    def sampling_dict(self) -> dict[str, Any]:
        """The fields that determine the samples (batch size and backend excluded: they do not change them
        for the HF sampler; vLLM samples differ from HF ones, so the backend is recorded separately)."""
        extra = {} if self.sample_dtype == "model" else {"sample_dtype": self.sample_dtype}  # old records stay valid
        return {
            **extra,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "max_new_tokens": self.max_new_tokens,
            "min_new_tokens": self.min_new_tokens,
            "max_prompt_length": self.max_prompt_length,
            "seed": self.seed,
        }


def completion_seed(seed: int, index: int, j: int, stream: str = "") -> int:
    """A 63-bit seed for completion ``j`` of prompt ``index`` (a hash, so nearby seeds give unrelated streams)."""
    digest = hashlib.sha256(f"{stream}:{seed}:{index}:{j}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def pick_device(device: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}", field="device", fix="use auto, cpu, cuda or cuda:N") from None


# ----------------------------------------------------------------------------------------- samplers
@dataclass
class Completion:
    """One sampled completion: its token ids (ending in EOS when ``finished``) and the decoded text.

    ``logps`` (HF sampler only): ``log π(y_t | x, y_<t)`` of each id under the model that sampled it at the sampling
    temperature, before ``min_new_tokens`` / top-k / top-p (with those off, exactly the distribution sampled); the
    same numbers as a forward pass of that model on the ids (``tests/test_sample_fast.py``).
    """

    ids: list[int]
    text: str
    finished: bool
    logps: list[float] | None = None


class Sampler(Protocol):
    def generate(self, prompt_ids: Sequence[list[int]], indices: Sequence[int], k: int) -> list[list[Completion]]:
        """``k`` completions for each prompt; ``indices`` are the prompts' positions in the whole prompt list."""
        ...


_PARALLEL_UNIFORMS = 1 << 20
"""Uniforms per step from which :meth:`ScoredDraw.uniforms` splits the rows between threads (smaller fills cost
less than handing them over)."""


@functools.lru_cache(maxsize=4)
def _uniform_pool(n: int) -> Any:
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=n, thread_name_prefix="exoalign-uniforms")


class SeededSampler:
    """Logits processor that picks each row's next token from that row's own random stream (Gumbel-max).

    Placed last in the processor list (after temperature / top-k / top-p), it returns scores that are ``0``
    for the drawn token and ``−inf`` elsewhere, so greedy decoding emits exactly the drawn token.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device) -> None:
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    def draw(self, scores: torch.Tensor) -> torch.Tensor:
        """The drawn token of each row ``(R,)``: ``argmax_v (scores_v + g_v)``, g Gumbel from the row's stream."""
        R, V = scores.shape  # (rows, vocab)
        u = torch.stack(
            [torch.rand(V, generator=g, device=scores.device) for g in self.generators]
        )  # (R, V), one stream per row
        tiny = torch.finfo(torch.float32).tiny
        gumbel = -torch.log(-torch.log(u.clamp(min=tiny)))  # (R, V)
        return (scores.float() + gumbel).argmax(-1)  # (R,)  -inf scores (filtered tokens) never win

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        choice = self.draw(scores)
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, choice.unsqueeze(-1), 0.0)
        return out


class ScoredDraw(SeededSampler):
    """:class:`SeededSampler` that also records each drawn token's log-prob under the model (at the temperature).

    Receives temperature-scaled logits, so ``log_softmax`` of them is the model's distribution at the sampling
    temperature; then bans EOS for the first ``min_new_tokens`` steps (what generate's own processor does),
    applies the top-k / top-p ``warpers`` and draws. The draw sees the same scores as :class:`SeededSampler`
    after generate's processors, so the tokens are the same; ``logps`` holds one ``(R,)`` tensor per step.
    :meth:`next_tokens` is the step the sampler's decode loop calls; ``__call__`` wraps it as a logits processor.
    The ``(R, V)`` uniforms and the scratch of the log-sum-exp live in buffers reused from step to step (a fresh
    50 MB tensor per step costs its page faults on every step).
    """

    def __init__(self, seeds: Sequence[int], device: torch.device, *, warpers: list, min_new_tokens: int,
                 eos_id: int | None) -> None:
        super().__init__(seeds, device)
        self.warpers, self.min_new, self.eos = warpers, min_new_tokens, eos_id
        self.logps: list[torch.Tensor] = []
        self._u: torch.Tensor | None = None  # (R, V) uniforms, refilled each step
        self._tmp: torch.Tensor | None = None  # (R, V) scratch of the log-sum-exp
        self._row_max: tuple[Any, Any] = (None, None)  # (scores, their row maxima) of the last draw

    def _buffer(self, name: str, like: torch.Tensor) -> torch.Tensor:
        buf = getattr(self, name)
        if buf is None or buf.shape != like.shape or buf.device != like.device:
            buf = torch.empty(like.shape, dtype=torch.float32, device=like.device)
            setattr(self, name, buf)
        return buf

    def uniforms(self, scores: torch.Tensor) -> torch.Tensor:
        """``(R, V)``: row ``r`` holds the next ``V`` uniforms of stream ``r``: the numbers ``torch.rand(V,
        generator=g)`` returns (written in place into a reused buffer instead of stacked). Each stream is serial;
        on a CPU with several torch threads the rows are split between that many Python threads (torch releases the
        GIL while it fills a row), which changes no number: a third of the draw's time at 256 rows × 49 152."""
        u = self._buffer("_u", scores)
        V, gens = scores.shape[1], self.generators

        inference = torch.is_inference_mode_enabled()  # thread-local: the helper threads take the caller's

        def fill(lo: int, hi: int) -> None:
            with torch.inference_mode(inference), torch.no_grad():
                for r in range(lo, hi):
                    torch.rand(V, generator=gens[r], out=u[r])

        workers = min(torch.get_num_threads(), len(gens)) if u.device.type == "cpu" else 1
        if workers <= 1 or len(gens) * V < _PARALLEL_UNIFORMS:
            fill(0, len(gens))
            return u
        bounds = [len(gens) * i // workers for i in range(workers + 1)]
        pool = _uniform_pool(workers - 1)
        jobs = [pool.submit(fill, bounds[i], bounds[i + 1]) for i in range(1, workers)]
        fill(bounds[0], bounds[1])
        for job in jobs:
            job.result()
        return u

    def draw(self, scores: torch.Tensor) -> torch.Tensor:
        """The same draw as :meth:`SeededSampler.draw` (same uniforms, same ``argmax (scores + g)``), with the
        Gumbel noise ``g = −log(−log u)`` (two logs per vocabulary entry: most of the draw's time) computed only
        for the tokens that can win: ``v`` can beat the row's top-scoring token ``a`` only if
        ``s_v + g(max u) ≥ s_a + g(u_a)``, since ``g`` increases with ``u``. A relative margin of 1e-3 keeps the
        bound's own rounding from dropping a winner. The argmax over the few candidates is taken per row on the
        candidate list itself (the largest ``s + g``, lowest index on ties: what the dense argmax returns)."""
        R, V = scores.shape  # (rows, vocab)
        u = self.uniforms(scores)  # (R, V), one stream per row: the same numbers as SeededSampler's
        s = scores.float()
        tiny = torch.finfo(torch.float32).tiny

        def gumbel(x: torch.Tensor) -> torch.Tensor:
            return -torch.log(-torch.log(x.clamp(min=tiny)))

        top_s, top = s.max(-1, keepdim=True)  # (R, 1) any top-scoring token serves as the reference
        self._row_max = (scores, top_s)  # the log-sum-exp of these same scores reuses their row maxima
        reach = top_s + gumbel(u.gather(1, top))  # (R, 1) the top token's score + noise
        best_noise = gumbel(u.amax(-1, keepdim=True))  # (R, 1) no token gets more noise than this
        cand = s >= reach - best_noise - 1e-3 * (1.0 + reach.abs())  # (R, V); -inf scores never qualify
        rows, cols = cand.nonzero(as_tuple=True)  # (n,), (n,) row-major order
        z = s[rows, cols] + gumbel(u[rows, cols])  # (n,) the candidates' perturbed scores
        row_best = torch.full((R,), float("-inf"), device=s.device).scatter_reduce_(0, rows, z, "amax")  # (R,)
        win = z == row_best[rows]  # (n,)
        first = torch.full((R,), V, dtype=torch.long, device=s.device)
        return first.scatter_reduce_(0, rows[win], cols[win], "amin")  # (R,)

    def logsumexp(self, scores: torch.Tensor) -> torch.Tensor:
        """``(R,)`` ``log Σ_v exp(scores_v)`` in fp32, through a reused scratch buffer."""
        tmp = self._buffer("_tmp", scores)
        seen, top_s = self._row_max
        # (R, 1) finite: some token always has a finite score; the draw's maxima when it drew from these scores
        m = top_s if seen is scores else scores.amax(-1, keepdim=True)
        torch.sub(scores, m, out=tmp).exp_()
        return m.squeeze(-1) + tmp.sum(-1).log()

    def next_tokens(self, input_ids: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor:
        """``(R,)`` the drawn tokens, from ``scores`` (R, V) already divided by the temperature; records their
        log-probs in ``logps``."""
        scores = scores.float()
        if len(self.logps) < self.min_new and self.eos is not None:
            banned = scores.clone()
            banned[:, self.eos] = float("-inf")
        else:
            banned = scores
        for warp in self.warpers:
            banned = warp(input_ids, banned)
        choice = self.draw(banned)  # (R,)
        picked = scores.gather(1, choice.unsqueeze(-1)).squeeze(-1)  # (R,)
        self.logps.append(picked - self.logsumexp(scores))
        return choice

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        choice = self.next_tokens(input_ids, scores)
        out = torch.full_like(scores, float("-inf"), dtype=torch.float32)
        out.scatter_(1, choice.unsqueeze(-1), 0.0)
        return out


def _decode(tokenizer: Any, ids: list[int], eos_id: int | None, logps: list[float] | None = None) -> Completion:
    finished = eos_id is not None and eos_id in ids
    if finished:
        ids = ids[: ids.index(eos_id) + 1]
    body = ids[:-1] if finished else ids
    return Completion(ids=ids, text=tokenizer.decode(body, skip_special_tokens=True), finished=finished,
                      logps=None if logps is None else logps[: len(ids)])


def summed_logps(groups: Sequence[Sequence[Completion]]) -> list[list[float]] | None:
    """``[n_prompts][k]`` sequence log-probs the sampler reported (sums over each completion's ids, in float64), or
    None when any completion came without them (vLLM, the pre-change path)."""
    if any(c.logps is None for g in groups for c in g):
        return None
    return [[math.fsum(c.logps) for c in g] for g in groups]  # type: ignore[arg-type]


def sampling_copy(model: torch.nn.Module, dtype: str) -> torch.nn.Module:
    """``model`` itself when ``dtype`` is ``model`` or its own dtype, else an eval-mode copy in ``dtype`` (the
    caller's weights, e.g. fp32 masters being trained, are left as they are)."""
    import copy

    if dtype == "model":
        return model
    want = getattr(torch, dtype)
    if next(model.parameters()).dtype == want:
        return model
    if want == torch.bfloat16:
        warn_slow_bf16(next(model.parameters()).device, "sample_dtype=bfloat16", "sample_dtype=model (fp32)")
    # The copy is made in ``dtype`` directly: every floating parameter and persistent buffer is cast into the
    # deepcopy's memo (shared tensors, e.g. tied embeddings, stay shared), so the caller's fp32 weights are read
    # once instead of being copied whole and then cast. Buffers a model computes for itself (non-persistent: the
    # rotary embedding's frequencies) keep their dtype, as in the model ``from_pretrained`` loads in ``dtype``:
    # bf16 frequencies would shift every position's angle (and the bf16 π_sft against a checkpoint loaded in
    # bf16 would be two computations, docs/pipeline.md).
    memo: dict[int, Any] = {}
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            if id(t) not in memo and type(t) in (torch.Tensor, torch.nn.Parameter) and t.is_floating_point():
                cast = t.detach().to(want)
                memo[id(t)] = torch.nn.Parameter(cast, requires_grad=False) if isinstance(t, torch.nn.Parameter) \
                    else cast
    twin = copy.deepcopy(model, memo).to(want).eval()  # .to: anything the memo did not hold
    own: dict[int, torch.Tensor] = {}  # the source's non-persistent buffers, back in their dtype (shared stay shared)
    for src, dst in zip(model.modules(), twin.modules()):
        for name in src._non_persistent_buffers_set:
            t = src._buffers.get(name)
            if t is not None and t.is_floating_point():
                dst._buffers[name] = own.setdefault(id(t), t.detach().clone())
    twin.requires_grad_(False)
    _undo_accelerate_wrappers(twin)
    use_decode_attention(twin)
    pack_linears(twin)
    return twin


def _undo_accelerate_wrappers(model: torch.nn.Module) -> None:
    """Undo, in a sampling copy, the forward wrappers accelerate's mixed precision put on the policy (autocast and
    fp32 outputs, stored on the module as a method of the module, the one before them kept as
    ``_original_forward``). The copy runs the forward the model had before them, in its own dtype: the same logits
    (the sampler reads them into fp32 itself). A method of an object kept on that object is a reference cycle, and
    it held every dropped copy's weights until Python's next full collection (an online run grew by a bf16 copy
    per round; docs/speed.md). Modules without accelerate's mark keep whatever forward they have."""
    for m in model.modules():
        original = m.__dict__.pop("_original_forward", None)
        if original is None:
            continue
        m.__dict__.pop("forward", None)
        plain = (isinstance(original, types.MethodType) and original.__self__ is m
                 and original.__func__ is getattr(type(m), "forward", None))
        if not plain:  # a forward of the model's own from before accelerate (kept as it was)
            m.forward = original


class _PackedForward(ModuleForward):
    """The ``forward`` :func:`pack_linears` gives one bf16 ``nn.Linear``: its weight packed in oneDNN's layout
    through oneDNN, ``F.linear`` of its own weight for another dtype or device or when gradients are needed. A
    pickled or deep-copied layer packs its own weight again on its first call (oneDNN's packed tensors are opaque:
    they neither copy nor pickle)."""

    def __init__(self, module: torch.nn.Linear, pack: bool = False) -> None:
        super().__init__(module)
        self.packed = self._pack(module) if pack else None

    @staticmethod
    def _pack(module: torch.nn.Linear) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), 64)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        module = self.module
        if x.dtype != module.weight.dtype or x.device.type != "cpu" or torch.is_grad_enabled() and x.requires_grad:
            return torch.nn.functional.linear(x, module.weight, module.bias)
        if self.packed is None:
            self.packed = self._pack(module)
        threads = _SPLIT.products
        if not threads:
            return self._product(x, self.packed, module.bias)
        torch.set_num_threads(threads)  # inside :class:`ProductThreads`: the product on the caller's threads
        try:
            return self._product(x, self.packed, module.bias)
        finally:
            torch.set_num_threads(1)

    @staticmethod
    def _product(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def pack_linears(model: torch.nn.Module) -> int:
    """Give the ``nn.Linear`` layers of a frozen bf16 CPU model (a sampling copy, a model loaded to be sampled)
    their weights in oneDNN's own matmul layout, once, instead of on every call.

    A bf16 matmul on CPU (oneDNN) first reorders the weight into its blocked layout; at sampling's shapes (tens of
    rows per decode step) that reorder costs as much as the product: the LM head's call took 11.4 ms plainly and
    3.6 ms on the packed weight, a layer's projections ~1.3x less (docs/speed.md). The products are the same
    kernels', equal bit for bit in most shapes and within one bf16 rounding in the others (one of 50 shapes tried
    on 2 threads), so a bf16 draw can part from the unpacked copy's after a near tie: the samples are the packed
    model's, and the log-probs the sampler reports are too. Each layer keeps its ``weight`` (state dict, tied
    embeddings and the log-prob code's direct use of the head's weight are unchanged); only its ``forward`` reads
    the packed copy, and falls back to ``F.linear`` for another dtype or device or when gradients are needed.
    Returns the number of layers packed (0 where oneDNN's bf16 is not available: nothing changes).
    """
    packable = [m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.dtype == torch.bfloat16
                and m.weight.device.type == "cpu" and not m.weight.requires_grad]
    if not packable or not _bf16_packing():
        return 0
    for m in packable:
        m.forward = _PackedForward(m, pack=True)
    return len(packable)


class _ThreadSplit(threading.local):
    products = 0
    """torch threads of the packed products while the rest of a forward runs on one (0: no split; per OS thread,
    as torch's thread count is)."""


_SPLIT = _ThreadSplit()


class ProductThreads:
    """Within: a forward of ``model`` runs its packed products (:func:`pack_linears`) on the caller's torch threads
    and every other operator on one thread; nothing changes for a model without packed layers or on one thread.
    Reusable: one object can be entered once per decode step.

    For the decode steps of a sampling copy. There the products are the only operators large enough to gain from a
    second thread; the rest are thousands of small ones (norms, rotary, the decode attention, residuals), and
    under ``OMP_WAIT_POLICY=PASSIVE`` (what the CLI and ``import exoalign`` set) each parallel region first wakes
    the sleeping thread: at 32 rows a bf16 ``silu`` of the MLP takes 35 µs on one thread and 73 on two, a layer's
    decode attention 333 and 488 µs; a SmolLM2 decode step of 32 or 256 rows on 2 threads is 5-12 % faster with the
    split (``benchmarks/results/sampling/product-threads-2026-12-08/``, docs/speed.md). The products' threads are
    the caller's, and the other operators at a decode step's sizes compute each row alike on one thread or two
    (serially or split by rows): the same tokens and log-probs either way (``tests/test_sample_fast.py``).
    The caller's fp32 model is not split: its SDPA attention gains from the second thread (2.5-3 % slower a step).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.packed = _has_packed(model)
        self.threads = 0

    def __enter__(self) -> ProductThreads:
        threads = torch.get_num_threads()
        if threads > 1 and self.packed and not _SPLIT.products:
            self.threads = _SPLIT.products = threads
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
            self.threads = _SPLIT.products = 0


def _has_packed(model: torch.nn.Module) -> bool:
    return any(isinstance(m.__dict__.get("forward"), _PackedForward) for m in model.modules())


def _bf16_packing() -> bool:
    """oneDNN with bf16 on this CPU, and torch's packed-linear ops present (they are internal: checked, not assumed)."""
    try:
        return bool(fast_bf16("cpu") and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
                    and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
    except (AttributeError, RuntimeError):
        return False


class HFSampler:
    """Batched sampling with ``model.generate`` (prompts left-padded) and per-completion seeds.

    The default path (``shared_prefill``) runs each prompt once (the prompts' shared start once in all), copies
    its KV cache to its ``k`` rows and decodes all ``prompts × k`` rows from there in its own loop (what greedy
    ``generate`` does, without its per-step overhead: :meth:`_decode_rows`), with :class:`ScoredDraw` drawing the
    tokens and recording their log-probs. ``shared_prefill=false`` is the pre-change path (every row prefilled on its own,
    :class:`SeededSampler`, no log-probs), kept to check that both give the same tokens.
    ``sample_dtype`` samples from a converted copy of the weights (made once per sampler).
    ``prompt_caches`` (optional, e.g. eval's :class:`~exoalign.eval.reference.PrefixCachedLogps` of π_sft): kept
    prompt KV caches of the model sampled from; when its ``model`` is the sampling model, the fast path takes each
    batch's prefill from its ``prompt_cache(prompt_ids)`` (:func:`prompt_prefill`, the same computation) instead
    of running it again.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, settings: SamplingSettings, stream: str = "",
                 prompt_caches: Any = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.s = settings
        self.stream = stream
        self.prompt_caches = prompt_caches
        self._sampling_model: torch.nn.Module | None = None

    @property
    def sampling_model(self) -> torch.nn.Module:
        if self._sampling_model is None:
            self._sampling_model = sampling_copy(self.model, getattr(self.s, "sample_dtype", "model"))
        return self._sampling_model

    def _config(self, pad_id: int, min_new: int | None, static: bool) -> Any:
        from transformers import GenerationConfig

        return GenerationConfig(
            do_sample=False,  # the draw happens in the seeded processor; greedy just takes it
            num_beams=1,
            max_new_tokens=self.s.max_new_tokens,
            min_new_tokens=min_new,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=pad_id,
            **({"cache_implementation": "static"} if static else {}),
        )

    def _warpers(self) -> list:
        from transformers import TopKLogitsWarper, TopPLogitsWarper

        s, out = self.s, []
        if s.top_k > 0:
            out.append(TopKLogitsWarper(s.top_k))
        if s.top_p < 1.0:
            out.append(TopPLogitsWarper(s.top_p))
        return out

    def _run(self, model: torch.nn.Module, **kw: Any) -> torch.Tensor:
        # generate() fills every unset field of the config from the model's own generation_config.json (a chat
        # model may ship temperature / top_p / repetition_penalty there), which would change the distribution
        # sampled. A blank config during the call leaves only our settings and neutral defaults.
        from transformers import GenerationConfig

        saved = model.generation_config
        model.generation_config = GenerationConfig()
        try:
            return model.generate(**kw)
        finally:
            model.generation_config = saved

    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[list[int]], indices: Sequence[int], k: int) -> list[list[Completion]]:
        from transformers import LogitsProcessorList, TemperatureLogitsWarper

        tok, s = self.tokenizer, self.s
        model = self.sampling_model
        device = next(model.parameters()).device
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        B, P = len(prompt_ids), max(len(p) for p in prompt_ids)
        input_ids = torch.full((B, P), pad_id, dtype=torch.long)  # (B, P), left padded
        mask = torch.zeros((B, P), dtype=torch.long)
        for r, p in enumerate(prompt_ids):
            input_ids[r, P - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[r, P - len(p) :] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        # Row r = (prompt r // k, completion r % k).
        seeds = [completion_seed(s.seed, i, j, self.stream) for i in indices for j in range(k)]
        static = getattr(s, "kv_cache", "dynamic") == "static"
        fast = getattr(s, "shared_prefill", True) and not static
        temperature = TemperatureLogitsWarper(s.temperature)
        rows_ids, rows_mask = input_ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)  # (R, P)
        if not fast:
            processors = [temperature, *self._warpers(), SeededSampler(seeds, device)]
            out = self._run(model, input_ids=rows_ids, attention_mask=rows_mask,
                            generation_config=self._config(pad_id, s.min_new_tokens or None, static),
                            logits_processor=LogitsProcessorList(processors))  # (R, P + new)
            done = [_decode(tok, ids, tok.eos_token_id) for ids in out[:, P:].tolist()]
            return [done[n * k : (n + 1) * k] for n in range(B)]
        draw = ScoredDraw(seeds, device, warpers=self._warpers(), min_new_tokens=s.min_new_tokens,
                          eos_id=tok.eos_token_id)
        ids, amask, shared = _shared_prefix_layout(prompt_ids, pad_id)
        kept = self.prompt_caches
        prefilled = kept.prompt_cache(prompt_ids) if kept is not None and kept.model is model and P > 1 else None
        new = self._decode_rows(model, ids.to(device), amask.to(device), k, draw, pad_id, shared,
                                prefilled)  # (R, steps)
        logps = torch.stack(draw.logps, 1).tolist()  # (R, steps)
        done = [_decode(tok, ids, tok.eos_token_id, lp) for ids, lp in zip(new.tolist(), logps)]
        return [done[n * k : (n + 1) * k] for n in range(B)]

    def _decode_rows(self, model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, k: int,
                     draw: ScoredDraw, pad_id: int, shared: int = 0, prefilled: Any = None) -> torch.Tensor:
        """The fast path's decoding: ``(B·k, steps)`` new ids of every row (pad after a row's EOS), from the
        prompts laid out by :func:`_shared_prefix_layout` (``shared`` first columns the same in every row);
        ``prefilled``: :func:`prompt_prefill`'s cache of these prompts (one row each, the caller's copy), if kept.

        What ``generate`` does in greedy mode with ``[temperature, draw]`` as its processors, written out: the
        prompts' cache (:meth:`_prefill`), then one forward pass of the model per new token on the last token of
        every row, positions counted from the attention mask as ``generate`` counts them, scores
        ``logits.float() / T`` (generate's fp32 copy and its temperature warper: the same numbers), the draw's
        token, pad for finished rows, stop when every row has emitted EOS or after ``max_new_tokens``. Without
        ``generate``'s per-step machinery (processor lists, stopping criteria, an fp32 copy and a −inf score
        tensor per step), which cost about as much as the decode's attention at the demo's shape.
        """
        from transformers import DynamicCache

        s, eos = self.s, self.tokenizer.eos_token_id
        rows_ids, rows_mask = input_ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)  # (R, P)
        P = rows_ids.shape[1]
        position_ids = rows_mask.cumsum(-1) - 1  # (R, P)
        position_ids.masked_fill_(rows_mask == 0, 1)
        if prefilled is None and P > 1:
            prefilled = self._prefill(model, input_ids, mask, 1, shared)  # one row per prompt, as a kept cache
        cache = prefilled if prefilled is not None else DynamicCache(config=model.config)
        if k > 1 and prefilled is not None:
            cache.batch_repeat_interleave(k)
        if P > 1:  # room for every new token up front: no copy of the whole cache per layer and step
            cache = _with_room(cache, s.max_new_tokens, static=uses_decode_attention(model))
        cur, pos, attn = rows_ids[:, -1:], position_ids[:, -1:], rows_mask  # (R, 1), (R, 1), (R, P)
        unfinished = torch.ones(len(rows_ids), dtype=torch.bool, device=rows_ids.device)  # (R,)
        scores: torch.Tensor | None = None  # (R, V) fp32, reused
        seq, new = rows_ids, []
        split = ProductThreads(model)  # packed copies: the products on every thread, the rest on one
        for _ in range(s.max_new_tokens):
            with split:
                logits = model(input_ids=cur, attention_mask=attn, position_ids=pos, cache=cache,
                               use_cache=True).logits[:, -1]  # (R, V)
            if scores is None or scores.shape != logits.shape:
                scores = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
            scores.copy_(logits)  # = logits.float() / T, bit for bit (x / 1 is x: no division at T = 1)
            if s.temperature != 1.0:
                scores.div_(s.temperature)
            nxt = draw.next_tokens(seq, scores)  # (R,)
            if eos is not None:
                nxt = torch.where(unfinished, nxt, pad_id)
                unfinished &= nxt != eos
            new.append(nxt)
            if eos is not None and not bool(unfinished.any()):
                break
            cur, pos = nxt.unsqueeze(-1), pos + 1
            attn = torch.cat([attn, attn.new_ones((len(attn), 1))], -1)  # (R, P + t)
            seq = torch.cat([seq, cur], -1)
        return torch.stack(new, 1)  # (R, steps)

    @staticmethod
    def _prefill(model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, k: int, shared: int = 0) -> Any:
        """KV cache of every prompt but its last token, computed once per prompt and repeated for its ``k`` rows;
        the decode loop then feeds the last prompt token itself (positions counted from the mask, as generate
        counts them). The first ``shared`` columns (the same tokens in every row) are computed once, for one row."""
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        position_ids = mask.cumsum(-1) - 1  # (B, P)
        position_ids.masked_fill_(mask == 0, 1)
        # The decoder alone: the prefill needs no logits (and a head on a sliced last position can take a slow
        # batched-matmul path that copies the head's weight once per row).
        body = model.get_decoder() if hasattr(model, "get_decoder") else model
        P = input_ids.shape[1]
        if shared:
            body(input_ids=input_ids[:1, :shared], attention_mask=mask[:1, :shared],
                 position_ids=position_ids[:1, :shared], cache=cache, use_cache=True)
            cache.batch_repeat_interleave(len(input_ids))
        if shared < P - 1:
            body(input_ids=input_ids[:, shared:-1], attention_mask=mask[:, :-1],
                 position_ids=position_ids[:, shared:-1], cache=cache, use_cache=True)
        if k > 1:
            cache.batch_repeat_interleave(k)
        return cache


def prompt_prefill(model: torch.nn.Module, prompt_ids: Sequence[list[int]], pad_id: int,
                   ) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """The sampler's prefill of a batch of prompts, one row each: (KV cache of every prompt but its last token, or
    None for one-column batches; ids ``(B, P)`` and attention mask ``(B, P)`` in :func:`_shared_prefix_layout`,
    on the model's device). What :meth:`HFSampler.generate` computes before its decode loop, so a cache kept from
    here (eval's π_sft prompt caches) gives the sampler's numbers bit for bit."""
    device = next(model.parameters()).device
    ids, mask, shared = _shared_prefix_layout(prompt_ids, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    cache = HFSampler._prefill(model, ids, mask, 1, shared) if ids.shape[1] > 1 else None
    return cache, ids, mask


def _with_room(cache: Any, extra: int, static: bool) -> Any:
    """The prefill's KV cache moved into layers with room for ``extra`` more tokens per row, so that a new token is
    written in place: a dynamic cache concatenates the whole cache with each new token, every layer and step (at
    the demo's shape, 256 rows, the profiler put 7.8 of an fp32 decode's 27 CPU-s there; docs/speed.md).

    * ``static`` (models running :func:`exoalign.attention._decode_attention`: sampling copies): transformers'
      static layers; the attention reads the full buffer, the unfilled columns masked (``get_mask_sizes`` sizes the
      mask to the buffer, the 2D mask padded with zeros), and its softmax over them adds exact zeros, so the numbers
      differ from the dynamic cache's by rounding at most.
    * otherwise (the caller's own model, SDPA or any attention on a dynamic cache): dynamic layers over a buffer
      (:func:`_roomy_layer_class`), whose keys and values are views of the filled columns, so attention reads the
      same shapes and values and fp32 samples stay the pre-change tokens bit for bit.

    A cache with any other kind of layer (sliding window, linear attention) is returned as it is. Moved: each layer
    of ``cache`` gives up its tensors as its copy is made, so the prefill's cache and its copy are not both held
    through the decode (that cost the decode of 256 rows ~0.5 GB of peak memory in fp32)."""
    from transformers.cache_utils import Cache, DynamicLayer, StaticLayer

    if not cache.layers or any(type(layer) is not DynamicLayer or not layer.is_initialized for layer in cache.layers):
        return cache  # sliding-window, linear-attention or other layers keep their own cache
    roomy, layers = _roomy_layer_class(), []
    for dyn in cache.layers:
        keys, values = dyn.keys, dyn.values  # (R, KV, L, D)
        if static:
            layer = StaticLayer(max_cache_len=keys.shape[2] + extra)
            layer.update(keys, values)  # allocates (R, KV, L + extra, D) and writes the first L columns
        else:
            layer = roomy(keys, values, extra)
        layers.append(layer)
        dyn.keys = dyn.values = None  # moved
        dyn.is_initialized = False
    return Cache(layers=layers)


@functools.cache
def _roomy_layer_class() -> type:
    """The dynamic layer with room of :func:`_with_room` (built on first use: transformers is imported lazily)."""
    from transformers.cache_utils import DynamicLayer

    class RoomyDynamicLayer(DynamicLayer):
        """A dynamic cache layer whose ``keys`` / ``values`` are views of the first columns of a buffer with room
        for more: each update writes the new columns in place instead of concatenating the whole cache. The views
        have the shapes and values the growing layer's tensors have (only their row strides differ), and its mask
        sizes are the dynamic layer's. A layer whose tensors were replaced by other code (crop, batch selection)
        is moved into a new buffer on its next update."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, extra: int) -> None:
            super().__init__()
            self.device, self.is_initialized = keys.device, True
            self._place(keys, values, extra)

        def _place(self, keys: torch.Tensor, values: torch.Tensor, extra: int) -> None:
            n = keys.shape[-2]
            self._k = keys.new_empty((*keys.shape[:-2], n + extra, keys.shape[-1]))
            self._v = values.new_empty((*values.shape[:-2], n + extra, values.shape[-1]))
            self._k[..., :n, :], self._v[..., :n, :] = keys, values
            self._set(n)

        def _set(self, n: int) -> None:
            # Views of the filled columns; kept to recognise them (an inference-mode view has no ``_base``).
            self.keys, self.values = self._k[..., :n, :], self._v[..., :n, :]
            self._views = (self.keys, self.values)

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:  # after reset(): start a buffer from these columns
                self.device, self.is_initialized = key_states.device, True
                self._place(key_states, value_states, key_states.shape[-2])
                return self.keys, self.values
            n, m = self.keys.shape[-2], key_states.shape[-2]
            ours = self.keys is self._views[0] and self.values is self._views[1]
            if not ours or n + m > self._k.shape[-2]:
                self._place(self.keys, self.values, max(m, n))  # replaced tensors, or out of room: a new buffer
            self._k[..., n : n + m, :], self._v[..., n : n + m, :] = key_states, value_states
            self._set(n + m)
            return self.keys, self.values

    return RoomyDynamicLayer


def _shared_prefix_layout(prompt_ids: Sequence[list[int]], pad_id: int,
                          min_shared: int = 4) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Prompts as ``(B, P)`` ids and attention mask, with the tokens every prompt starts with (a chat template's
    system prompt) in the first ``c`` columns, then the padding, then each prompt's rest, flush right:
    ``[shared | pad … | rest]``. Positions are counted from the mask, so every token has the position (and every
    query the keys) it has in the left-padded layout; only the shared columns line up, and the prefill computes
    them once. ``c`` is 0 (plain left padding) when the prompts share fewer than ``min_shared`` tokens; it never
    takes a prompt's last token (the decode loop feeds that one)."""
    B, P = len(prompt_ids), max(len(p) for p in prompt_ids)
    c = min(len(p) for p in prompt_ids) - 1
    first = prompt_ids[0]
    for p in prompt_ids[1:]:
        c = next((i for i in range(c) if p[i] != first[i]), c)
    c = c if B > 1 and c >= min_shared else 0
    ids = torch.full((B, P), pad_id, dtype=torch.long)  # (B, P)
    mask = torch.zeros((B, P), dtype=torch.long)
    for r, p in enumerate(prompt_ids):
        rest = len(p) - c
        ids[r, :c], ids[r, P - rest :] = torch.tensor(p[:c], dtype=torch.long), torch.tensor(p[c:], dtype=torch.long)
        mask[r, :c], mask[r, P - rest :] = 1, 1
    return ids, mask, c


class VLLMSampler:
    """Sampling with vLLM (GPU only). Same output as :class:`HFSampler`: token ids + text per completion.

    Seeds are per prompt (``SamplingParams(seed=…)`` with ``n=k``), so results are independent of batching
    but are not the same draws as the HF sampler's.
    """

    def __init__(
        self, name_or_path: str, tokenizer: Any, settings: SamplingSettings, *, dtype: str = "auto",
        trust_remote_code: bool = False, stream: str = "",
    ) -> None:
        from vllm import LLM  # imported here: vllm is optional

        self.tokenizer = tokenizer
        self.s = settings
        self.stream = stream
        self.llm = LLM(
            model=name_or_path,
            tokenizer=getattr(tokenizer, "name_or_path", None) or name_or_path,
            dtype={"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(dtype, dtype),
            seed=settings.seed,
            trust_remote_code=trust_remote_code,
            gpu_memory_utilization=settings.gpu_memory_utilization,
        )

    def generate(self, prompt_ids: Sequence[list[int]], indices: Sequence[int], k: int) -> list[list[Completion]]:
        from vllm import SamplingParams

        s, eos = self.s, self.tokenizer.eos_token_id
        specials = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        params = [
            SamplingParams(
                n=k,
                temperature=s.temperature,
                top_k=s.top_k if s.top_k > 0 else -1,
                top_p=s.top_p,
                max_tokens=s.max_new_tokens,
                min_tokens=s.min_new_tokens,
                seed=completion_seed(s.seed, i, 0, self.stream) % (2**31),
            )
            for i in indices
        ]
        prompts = [{"prompt_token_ids": list(p)} for p in prompt_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        groups = []
        for out in outputs:
            group = []
            for c in out.outputs:
                ids = list(c.token_ids)
                stop_id = None
                if c.finish_reason == "stop" and eos is not None:
                    # Keep the stop event in the ids so that its log-prob is counted: vLLM may or may not list
                    # the stop token (EOS, or another special such as an end-of-turn token) in token_ids.
                    if not ids or ids[-1] not in specials | {eos}:
                        ids.append(eos)
                    stop_id = ids[-1]
                group.append(_decode(self.tokenizer, ids, stop_id))
            groups.append(group)
        return groups

    def close(self) -> None:
        """Shut the engine down so that its GPU memory can go to the next model (eval loads several)."""
        import gc

        del self.llm
        try:  # vLLM keeps process-group state that outlives the engine object
            from vllm.distributed.parallel_state import (
                destroy_distributed_environment,
                destroy_model_parallel,
            )

            destroy_model_parallel()
            destroy_distributed_environment()
        except (ImportError, AttributeError, RuntimeError):
            pass
        gc.collect()
        torch.cuda.empty_cache()


def vllm_usable() -> bool:
    """True when vllm is importable and a CUDA device is present."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def resolve_backend(backend: str) -> str:
    """Turn ``auto`` into ``vllm`` or ``hf``; refuse ``vllm`` where it cannot run."""
    if backend == "auto":
        return "vllm" if vllm_usable() else "hf"
    if backend == "vllm" and not vllm_usable():
        raise ConfigError(
            "backend 'vllm' needs the vllm package and a CUDA GPU",
            field="backend",
            fix="pip install vllm on a GPU machine, or use backend=hf",
        )
    return backend


def load_prompts(source: str, *, split: str, tokenizer: Any, dedupe: bool, limit: int | None,
                 columns: Any = None, preset: str | None = None) -> list[str]:
    """Validated prompt texts of ``source`` (conversations rendered with the chat template), maybe deduplicated;
    ``columns``/``preset`` read a published schema (see ``exoalign.data.load_rows``)."""
    rows = load_rows(source, "prompt", split=split, tokenizer=tokenizer, columns=columns, preset=preset)
    prompts = [r["prompt"] for r in rows]
    if dedupe:
        prompts = list(dict.fromkeys(prompts))  # dicts keep insertion order: first appearance wins
    return prompts[:limit] if limit is not None else prompts


def build_sampler(
    cfg: SamplingSettings, name_or_path: str, tokenizer: Any, *, dtype: str, device: str,
    trust_remote_code: bool, stream: str = "", model: Any = None, prompt_caches: Any = None,
) -> Sampler:
    """The sampler of ``cfg.backend``; the HF one reuses ``model`` when given (eval shares it for log-probs) and
    ``prompt_caches`` (:class:`HFSampler`)."""
    if resolve_backend(cfg.backend) == "vllm":
        return VLLMSampler(resolve_model_path(name_or_path), tokenizer, cfg, dtype=dtype,
                           trust_remote_code=trust_remote_code, stream=stream)
    if model is None:
        model = load_causal_lm(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code, field="model")
        model.to(pick_device(device)).eval()
    return HFSampler(model, tokenizer, cfg, stream=stream, prompt_caches=prompt_caches)
