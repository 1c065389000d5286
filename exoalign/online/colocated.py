"""vLLM as the online sampler (``online.backend=vllm``, or ``auto`` on CUDA with vllm installed), colocated with
training: one engine per process on the same GPU as the policy.

At each round start :meth:`ColocatedVLLM.push` copies the policy's current weights into the engine through its
model executor (``llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights`` — vLLM maps the
Hugging Face parameter names itself; LoRA adapters are merged first and unmerged after), then the round samples
with :class:`~exoalign.sampling.VLLMSampler`'s request logic (one seed per prompt from ``(seed, prompt,
round)``). vLLM's own log-probs are never used: the round's ``log μ`` is recomputed by the training model on
exactly the sampled ids (``online.policy_table``), so the importance correction stays exact even where vLLM's
kernels round differently from the training forward.

Everything here needs only vLLM's interface (``vllm.LLM``, ``vllm.SamplingParams``, the model executor's
``load_weights``): the tests run it against a stand-in module with that interface on the CPU.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from typing import Any

import torch

from ..errors import ConfigError
from ..sampling import SamplingSettings, VLLMSampler
from ..train.step import is_peft, unwrap


def online_backend(backend: str, device: torch.device) -> str:
    """``auto`` → ``vllm`` when vllm is importable and training runs on CUDA, else ``hf``; refuses ``vllm``
    where it cannot run."""
    usable = importlib.util.find_spec("vllm") is not None and device.type == "cuda"
    if backend == "auto":
        return "vllm" if usable else "hf"
    if backend == "vllm" and not usable:
        raise ConfigError("online.backend=vllm needs the vllm package and training on a CUDA GPU",
                          field="online.backend", fix="pip install vllm on the GPU machine, or use online.backend=hf")
    return backend


def engine_model(llm: Any) -> Any:
    """The model inside a (single-GPU) vLLM engine, whose ``load_weights`` takes ``(name, tensor)`` pairs."""
    executor = llm.llm_engine.model_executor
    worker = executor.driver_worker
    runner = getattr(worker, "model_runner", None) or worker.worker.model_runner  # v0 / v1 worker wrappers
    return runner.model


def policy_weights(model: torch.nn.Module, state_dict: dict[str, torch.Tensor] | None = None
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """``(Hugging Face name, tensor)`` of the policy as it is now; LoRA adapters must be merged by the caller.

    ``state_dict`` is the full one under FSDP / ZeRO-3 (``accelerator.get_state_dict``, a collective)."""
    net = unwrap(model)
    sd = state_dict if state_dict is not None else net.state_dict()
    peft = is_peft(net)
    for name, tensor in sd.items():
        if peft:
            if "lora_" in name:
                continue
            name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        yield name, tensor.detach()


class ColocatedVLLM(VLLMSampler):
    """One vLLM engine for the whole run; :meth:`push` before each round, :meth:`at_round` for its stream."""

    def __init__(self, llm: Any, tokenizer: Any, settings: SamplingSettings) -> None:
        # VLLMSampler's generate() and close() only need these; the engine is built once by :meth:`create`.
        self.llm, self.tokenizer, self.s, self.stream = llm, tokenizer, settings, ""
        self.pushes = 0

    @classmethod
    def create(cls, source: str, tokenizer: Any, settings: SamplingSettings, *, dtype: str,
               num_processes: int, trust_remote_code: bool = False) -> ColocatedVLLM:
        from vllm import LLM  # optional dependency

        kw: dict[str, Any] = {}
        if num_processes > 1:  # each training process drives its own engine on its own GPU (as TRL's colocate mode)
            kw["distributed_executor_backend"] = "external_launcher"
        llm = LLM(model=source, tokenizer=getattr(tokenizer, "name_or_path", None) or source,
                  dtype={"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(dtype, "auto"),
                  seed=settings.seed, gpu_memory_utilization=settings.gpu_memory_utilization,
                  trust_remote_code=trust_remote_code, **kw)
        return cls(llm, tokenizer, settings)

    def at_round(self, r: int) -> ColocatedVLLM:
        self.stream = f"online-round{r}"
        return self

    @torch.no_grad()
    def push(self, model: torch.nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Load the policy's current weights into the engine (merged LoRA when the policy has adapters)."""
        net = unwrap(model)
        peft = is_peft(net)
        if peft:
            net.merge_adapter()
        try:
            engine_model(self.llm).load_weights(policy_weights(net, state_dict if not peft else None))
        finally:
            if peft:
                net.unmerge_adapter()
        reset = getattr(self.llm, "reset_prefix_cache", None)
        if reset is not None:  # cached KV blocks were computed with the old weights
            reset()
        self.pushes += 1
