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

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from .config import require
from .data import load_rows
from .errors import ConfigError
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

    def sampling_dict(self) -> dict[str, Any]:
        """The fields that determine the samples (batch size and backend excluded: they do not change them
        for the HF sampler; vLLM samples differ from HF ones, so the backend is recorded separately)."""
        return {
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
    """One sampled completion: its token ids (ending in EOS when ``finished``) and the decoded text."""

    ids: list[int]
    text: str
    finished: bool


class Sampler(Protocol):
    def generate(self, prompt_ids: Sequence[list[int]], indices: Sequence[int], k: int) -> list[list[Completion]]:
        """``k`` completions for each prompt; ``indices`` are the prompts' positions in the whole prompt list."""
        ...


class SeededSampler:
    """Logits processor that picks each row's next token from that row's own random stream (Gumbel-max).

    Placed last in the processor list (after temperature / top-k / top-p), it returns scores that are ``0``
    for the drawn token and ``−inf`` elsewhere, so greedy decoding emits exactly the drawn token.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device) -> None:
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        R, V = scores.shape  # (rows, vocab)
        u = torch.stack(
            [torch.rand(V, generator=g, device=scores.device) for g in self.generators]
        )  # (R, V), one stream per row
        tiny = torch.finfo(torch.float32).tiny
        gumbel = -torch.log(-torch.log(u.clamp(min=tiny)))  # (R, V)
        choice = (scores.float() + gumbel).argmax(-1)  # (R,)  -inf scores (filtered tokens) never win
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, choice.unsqueeze(-1), 0.0)
        return out


def _decode(tokenizer: Any, ids: list[int], eos_id: int | None) -> Completion:
    finished = eos_id is not None and eos_id in ids
    if finished:
        ids = ids[: ids.index(eos_id) + 1]
    body = ids[:-1] if finished else ids
    return Completion(ids=ids, text=tokenizer.decode(body, skip_special_tokens=True), finished=finished)


class HFSampler:
    """Batched sampling with ``model.generate`` (prompts left-padded) and per-completion seeds."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, settings: SamplingSettings, stream: str = "") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.s = settings
        self.stream = stream

    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[list[int]], indices: Sequence[int], k: int) -> list[list[Completion]]:
        from transformers import (
            GenerationConfig,
            LogitsProcessorList,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        tok, s = self.tokenizer, self.s
        device = next(self.model.parameters()).device
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        P = max(len(p) for p in prompt_ids)
        # Every prompt is repeated k times: row r = (prompt r // k, completion r % k).
        rows = [p for p in prompt_ids for _ in range(k)]
        input_ids = torch.full((len(rows), P), pad_id, dtype=torch.long)  # (R, P), left padded
        mask = torch.zeros((len(rows), P), dtype=torch.long)
        for r, p in enumerate(rows):
            input_ids[r, P - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[r, P - len(p) :] = 1
        seeds = [completion_seed(s.seed, i, j, self.stream) for i in indices for j in range(k)]
        processors = [TemperatureLogitsWarper(s.temperature)]
        if s.top_k > 0:
            processors.append(TopKLogitsWarper(s.top_k))
        if s.top_p < 1.0:
            processors.append(TopPLogitsWarper(s.top_p))
        processors.append(SeededSampler(seeds, device))
        config = GenerationConfig(
            do_sample=False,  # the draw happens in SeededSampler; greedy just takes it
            num_beams=1,
            max_new_tokens=s.max_new_tokens,
            min_new_tokens=s.min_new_tokens or None,
            eos_token_id=tok.eos_token_id,
            pad_token_id=pad_id,
            **({"cache_implementation": "static"} if getattr(s, "kv_cache", "dynamic") == "static" else {}),
        )
        # generate() fills every unset field of `config` from the model's own generation_config.json (a chat
        # model may ship temperature / top_p / repetition_penalty there), which would change the distribution
        # sampled. A blank config during the call leaves only the settings above and neutral defaults.
        saved = self.model.generation_config
        self.model.generation_config = GenerationConfig()
        try:
            out = self.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                generation_config=config,
                logits_processor=LogitsProcessorList(processors),
            )  # (R, P + new)
        finally:
            self.model.generation_config = saved
        new = out[:, P:].tolist()
        done = [_decode(tok, ids, tok.eos_token_id) for ids in new]
        return [done[n * k : (n + 1) * k] for n in range(len(prompt_ids))]


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
    trust_remote_code: bool, stream: str = "", model: Any = None,
) -> Sampler:
    """The sampler of ``cfg.backend``; the HF one reuses ``model`` when given (eval shares it for log-probs)."""
    if resolve_backend(cfg.backend) == "vllm":
        return VLLMSampler(resolve_model_path(name_or_path), tokenizer, cfg, dtype=dtype,
                           trust_remote_code=trust_remote_code, stream=stream)
    if model is None:
        model = load_causal_lm(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code, field="model")
        model.to(pick_device(device)).eval()
    return HFSampler(model, tokenizer, cfg, stream=stream)
