"""One loss evaluation on a collated batch: policy log-probs → targets → the registry's loss → metrics.

:func:`compute_loss` is the whole per-batch computation of ``exoalign train``; the loop only adds the
optimizer around it, and benchmarks call it directly. It contains no loss formula: the loss comes from
:func:`exoalign.losses.get_loss` by name.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from ..errors import ConfigError
from ..logprobs import sequence_logps
from ..losses import loss_info, pref_targets, reward_targets
from .config import LossConfig

log = logging.getLogger(__name__)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / accelerate / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks (its decoder layers): the modules whose class transformers names in
    ``_no_split_modules``; empty when it names none."""
    inner = unwrap(model)
    names: set[str] = set()
    for m in inner.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    return [m for m in inner.modules() if type(m).__name__ in names]


def compiled_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of ``model`` that ``nn.Module.compile`` compiled (and :func:`eager_fallback` has not reset)."""
    return [m for m in unwrap(model).modules() if getattr(m, "_compiled_call_impl", None) is not None]


def compile_model(model: torch.nn.Module, **options: Any) -> bool:
    """``torch.compile`` ``model`` in place (inductor by default); False with one warning if it cannot.

    Each repeated block (decoder layer, :func:`repeated_blocks`) is compiled on its own, so the layers share one
    compiled graph: SmolLM2's 30 layers compile in 25-45 s on 2 CPU cores (once per process, in the first steps),
    against minutes more for the whole model unrolled; the embedding, the head and the log-prob code around them
    stay eager. A model without named blocks is compiled whole. Compilation itself happens at the first call;
    :func:`eager_fallback` catches a failure there.
    """
    targets = repeated_blocks(model) or [unwrap(model)]
    try:
        for m in targets:
            m.compile(**options)
    except Exception as e:  # torch.compile unavailable on this platform / Python
        for m in targets:
            m._compiled_call_impl = None
        log.warning("train.compile: cannot compile (%s: %s); running eager", type(e).__name__, _first_line(e))
        return False
    return True


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def _is_compile_error(e: BaseException) -> bool:
    from torch._dynamo.exc import TorchDynamoException
    from torch._inductor.exc import InductorError

    return isinstance(e, (TorchDynamoException, InductorError))


def eager_fallback(model: torch.nn.Module, fn: Callable[[], Any]) -> Any:
    """``fn()``; if ``model`` is compiled and compiling fails, one warning line, ``model`` back to eager, ``fn()``."""
    compiled = compiled_modules(model)
    if not compiled:
        return fn()
    try:
        return fn()
    except Exception as e:
        if not _is_compile_error(e):
            raise
        log.warning("train.compile: compiling failed (%s: %s); running eager", type(e).__name__, _first_line(e))
        for m in compiled:
            m._compiled_call_impl = None  # what nn.Module.compile set: the module's own forward again
        return fn()


def is_peft(model: torch.nn.Module) -> bool:
    """True for a peft (LoRA) model, whose adapters can be switched off to recover the base model."""
    return hasattr(unwrap(model), "disable_adapter") and hasattr(unwrap(model), "peft_config")


def grouped_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], temperature: float = 1.0, prefix_sharing: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs and completion lengths, both ``[B, K]``, for a collated group batch.

    ``prefix_sharing`` encodes each prompt once for its K completions (``exoalign.packing``), which falls back
    to the K full sequences for models it cannot handle.
    """
    if prefix_sharing:
        from ..packing import group_logps

        return group_logps(model, batch, temperature=temperature, prefix_sharing=True)
    B, K = batch["group_mask"].shape
    logps, lengths = sequence_logps(
        model, batch["input_ids"], batch["attention_mask"], batch["labels"], temperature=temperature
    )  # (B*K,), (B*K,)
    return logps.view(B, K), lengths.view(B, K)


@torch.no_grad()
def reference_logps(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    temperature: float = 1.0,
    ref_model: torch.nn.Module | None = None,
    prefix_sharing: bool = False,
) -> torch.Tensor:
    """Reference log-probs ``[B, K]``: from ``ref_model``, or from ``model`` with its LoRA adapters disabled."""
    if ref_model is not None:
        return grouped_logps(ref_model, batch, temperature, prefix_sharing)[0]
    if not is_peft(model):
        raise ValueError("no reference: pass ref_model, put ref_logps in the batch, or use a peft (LoRA) model")
    # The base weights under LoRA are π_sft itself: no second copy of the model is needed.
    with unwrap(model).disable_adapter():
        return grouped_logps(unwrap(model), batch, temperature, prefix_sharing)[0]


def targets_for(batch: dict[str, torch.Tensor], loss_cfg: LossConfig, B: int, K: int, device: torch.device) -> torch.Tensor:
    """Log-target distribution ``[B, K]`` over the completions: pref ``log[1-ε, ε]`` or rw ``log softmax(r/β_r)``."""
    if "target_logprobs" in batch:  # online groups carry their importance-corrected targets (online_targets)
        return batch["target_logprobs"].float()
    if loss_cfg.target == "pref":
        if K != 2:
            raise ConfigError(
                f"loss.target=pref needs groups of 2 (chosen, rejected), the batch has K={K}",
                field="loss.target",
                fix="set data.k=2, or use loss.target=rw with scored groups",
            )
        return pref_targets(B, loss_cfg.eps, device=device)
    rewards = batch.get("rewards")
    if rewards is None:
        raise ConfigError(
            "loss.target=rw needs rewards but the data has none (pairs carry no rewards)",
            field="loss.target",
            fix="use loss.target=pref for chosen/rejected pairs, or score the groups first (exoalign score)",
        )
    return reward_targets(rewards.float(), loss_cfg.beta_r, batch["group_mask"])


def _pick(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(-1, idx.unsqueeze(-1)).squeeze(-1)  # (B, K), (B,) → (B,)


def batch_metrics(
    policy: torch.Tensor, ref: torch.Tensor | None, targets: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``logps/{chosen,rejected}`` (policy log-probs of the best/worst completion by target) and ``kl/batch``.

    ``kl/batch`` is ``mean(−h)`` with ``h = log π_θ − log π_sft`` over the batch's valid completions: the plain
    (k1) estimate of ``KL(π_sft ‖ π_θ)``, unbiased when the completions are samples of π_sft (it can dip below 0
    on one batch). It is a cheap drift monitor that rises when the policy lowers the likelihood of the data;
    ``exoalign eval`` measures ``KL(π_θ ‖ π_sft)`` on the policy's own samples. (The lower-variance k3 form
    ``e^h − 1 − h`` overflows here: trained policies raise chosen completions' log-probs by tens of nats.)
    """
    policy, targets = policy.detach(), targets.detach()
    best = targets.masked_fill(~mask, float("-inf")).argmax(-1)  # (B,)
    worst = targets.masked_fill(~mask, float("inf")).argmin(-1)  # (B,)
    out = {"logps/chosen": _pick(policy, best).mean(), "logps/rejected": _pick(policy, worst).mean()}
    if ref is not None:
        neg_h = (ref.detach() - policy).masked_fill(~mask, 0.0)  # (B, K)
        out["kl/batch"] = neg_h.sum() / mask.sum().clamp(min=1)
    return out


def compute_loss(
    model: torch.nn.Module,
    batch: dict[str, Any],
    loss_cfg: LossConfig,
    ref_model: torch.nn.Module | None = None,
    *,
    prefix_sharing: bool = False,
    logps: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mean loss over the batch's groups and its metrics (detached scalars).

    ``batch`` is a :class:`~exoalign.data.GroupCollator` batch: ``input_ids``/``attention_mask``/``labels``
    ``[B*K, T]``, ``group_mask`` ``[B, K]``, optional ``rewards`` and ``ref_logps`` ``[B, K]``. The reference
    log-probs come from the batch (cached), else from ``ref_model``, else from ``model`` with adapters disabled.
    ``prefix_sharing`` (``train.prefix_sharing``) encodes each prompt once for its K completions. ``logps``: the
    policy's ``(summed log-probs, lengths)`` of the batch (:func:`grouped_logps`) when the caller has them already.
    """
    info = loss_info(loss_cfg.name)
    mask = batch["group_mask"].to(torch.bool)  # (B, K)
    B, K = mask.shape
    policy, lengths = logps if logps is not None else grouped_logps(model, batch, loss_cfg.temperature,
                                                                    prefix_sharing)  # (B, K), (B, K)
    ref = None
    if info.needs_ref:
        ref = batch.get("ref_logps")
        if ref is None:
            ref = reference_logps(model, batch, loss_cfg.temperature, ref_model, prefix_sharing)
        elif (missing := torch.isnan(ref) & mask).any():  # a cached table scores only the rows a run plans to read
            rows = batch["index"][missing.any(-1)].tolist()
            raise RuntimeError(f"no reference log-probs for data rows {rows[:8]}: the cached table holds only the rows "
                               "this run's max_steps reads (train.max_steps, batch_size, grad_accum and the process "
                               "count decide which); start the run again with the settings it will train with")
        ref = ref.to(policy.dtype)
    targets = targets_for(batch, loss_cfg, B, K, policy.device)  # (B, K)
    # What the batch supplies (rloo, ppo: online groups carry the KL-shaped reward and the sampler's log-probs),
    # then the loss's own loss.params.
    supplied = {"lengths": lengths, "shaped_rewards": batch.get("shaped_rewards"),
                "sampler_logps": batch.get("sampler_logps")}
    kwargs = {name: supplied[name] for name in info.params if name in supplied}
    out = info.fn(policy, ref, targets, loss_cfg.beta_pi, mask, **kwargs, **loss_cfg.params)
    loss = out.losses.mean()
    metrics = {"loss": loss.detach(), **{k: v.detach() for k, v in out.metrics.items()}}
    metrics.update(batch_metrics(policy, ref, targets, mask))
    return loss, metrics
