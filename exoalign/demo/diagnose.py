"""Why EXO and DPO move alike in the demo (their first updates from π_sft), and how to present the prompts.

    python -m exoalign.demo.diagnose DIR [--groups 128]
    python -m exoalign.demo.diagnose --formats [--model smollm2] [--prompts 32] [--k 4] [--tokens 24]

``--formats`` measures, for a real model, the reward spread of π_sft's samples with the prompts presented
raw (the bare opening, continued as text) and as a chat instruction ("Continue this movie review: …" in the
chat template): the mean and standard deviation of the reward, and the mean standard deviation *within* a
group of K — what reward targets and best-vs-worst pairs learn from. The demo's ``prompt_format`` default
was picked by this measurement (docs/demo.md).

At the start of training π_θ = π_sft, so every log-ratio ``h_i = log π_θ(y_i|x) − log π_sft(y_i|x)`` is 0 and
the policy distribution over a group is uniform, ``p_i = 1/K``. The gradients of the losses with respect to
``h`` are then (β_π factored out):

* pref targets ``[1−ε, ε]`` (K = 2): DPO gives ``∂/∂(h_w − h_l) = −(½ − ε)``, EXO gives
  ``−¼·log((1−ε)/ε)``; both are the same constant for every pair, so the two parameter gradients are
  parallel (cosine 1) and only their length differs — which Adam normalises away. EXO-pref and DPO-pref
  take the same first steps; they part only as the pairs' margins spread.
* rw targets ``q = softmax(r/β_r)``: DPO gives ``p_i − q_i = 1/K − q_i`` (up the best completion, down
  the rest alike when q is near one-hot), EXO gives ``p_i·(log p_i − log q_i − KL(p‖q)) = −(r_i − r̄)/(K β_r)``
  — the policy gradient with a mean-reward baseline, every completion weighted by its centred reward. The
  directions differ, by how much depends on the rewards.

This module measures those cosines on the demo's own data and π_sft, between the parameter gradients and
between Adam's first updates (``sign(g)``), using the library's loss functions and ``sequence_logps``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..data import GroupCollator, load_rows, tokenize_rows
from ..logprobs import sequence_logps
from ..losses import get_loss, pref_targets, reward_targets
from ..models import load_causal_lm, load_tokenizer


def _flat_grad(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def first_update_cosines(out: Path, n_groups: int = 128) -> dict[str, float]:
    """Cosines between EXO's and DPO's gradients (and first Adam steps) at π_sft, pref and rw targets."""
    settings = json.loads((out / "results.json").read_text(encoding="utf-8"))["settings"]
    if settings.get("model", "scratch") == "scratch":
        path = str(out / "sft" / "final")
    else:
        from ..zoo import resolve_model_path

        path = resolve_model_path(settings["model"])
    tok = load_tokenizer(path)
    model = load_causal_lm(path)
    model.eval()  # dropout off: h = 0 exactly at π_sft
    params = [p for p in model.parameters() if p.requires_grad]
    rows = load_rows(str(out / "data" / "scored.jsonl"), "group", require_rewards=True)[:n_groups]
    data = tokenize_rows(rows, tok, max_length=settings["max_length"],
                         max_prompt_length=settings.get("max_prompt_length", 24))
    batch = GroupCollator(tok.pad_token_id)([data[i] for i in range(len(data))])
    B, K = batch["group_mask"].shape
    logps, _ = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])  # (B*K,)
    policy = logps.view(B, K)  # (B, K)
    ref = policy.detach()  # π_θ = π_sft: the reference log-probs are the policy's own
    rewards = batch["rewards"].float()  # (B, K)
    beta_pi, beta_r, eps = settings["beta_pi"], settings["beta_r"], settings["eps"]
    beta_pi = beta_pi[0] if isinstance(beta_pi, list) else beta_pi  # the gradients' directions do not depend on it
    out_: dict[str, float] = {"groups": float(B), "k": float(K)}

    rw = reward_targets(rewards, beta_r, batch["group_mask"])
    g_exo = _flat_grad(get_loss("exo")(policy, ref, rw, beta_pi, batch["group_mask"]).losses.mean(), params)
    g_dpo = _flat_grad(get_loss("dpo")(policy, ref, rw, beta_pi, batch["group_mask"]).losses.mean(), params)
    out_["rw_grad_cosine"], out_["rw_adam_step_cosine"] = _cos(g_exo, g_dpo), _cos(g_exo.sign(), g_dpo.sign())

    best, worst = rewards.argmax(1), rewards.argmin(1)  # the pref pair of each group, as `exoalign label` makes it
    idx = torch.arange(B)
    pair = torch.stack([policy[idx, best], policy[idx, worst]], 1)  # (B, 2), chosen first
    pair_ref = pair.detach()
    pt = pref_targets(B, eps)
    g_exo = _flat_grad(get_loss("exo")(pair, pair_ref, pt, beta_pi).losses.mean(), params)
    g_dpo = _flat_grad(get_loss("dpo")(pair, pair_ref, pt, beta_pi).losses.mean(), params)
    out_["pref_grad_cosine"], out_["pref_adam_step_cosine"] = _cos(g_exo, g_dpo), _cos(g_exo.sign(), g_dpo.sign())
    out_["pref_grad_norm_ratio_exo_over_dpo"] = float(g_exo.norm() / g_dpo.norm())
    return out_


def format_spread(model: str, n_prompts: int, k: int, tokens: int, seed: int, work: Path) -> dict[str, dict]:
    """Reward statistics of π_sft's samples per prompt format, through the demo's own prompt and sample stages."""
    import dataclasses

    import numpy as np

    from .pipeline import Demo, settings_for

    out: dict[str, dict] = {}
    for fmt in ("raw", "chat"):
        s = settings_for(False, seed, [f"model={model}", f"prompt_format={fmt}", f"n_train_prompts={n_prompts}",
                                       f"k={k}", f"max_new_tokens={tokens}"])
        demo = Demo(work / fmt, dataclasses.replace(s, n_eval_prompts=2), "cpu")
        demo.prompts()
        demo.sample()
        demo.score()
        rows = load_rows(str(demo.data / "scored.jsonl"), "group", require_rewards=True)
        r = np.asarray([row["rewards"] for row in rows], dtype=np.float64)  # (n_prompts, K)
        out[fmt] = {"mean": float(r.mean()), "std": float(r.std()), "within_group_std": float(r.std(1).mean()),
                    "groups_with_spread": float((r.max(1) - r.min(1) > 0.05).mean()),
                    "best_minus_worst": float((r.max(1) - r.min(1)).mean()), "zero_reward": float((r == 0).mean())}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exoalign.demo.diagnose", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", help="a finished `exoalign demo` directory (or, with --formats, a work dir)")
    parser.add_argument("--groups", type=int, default=128, help="scored groups to take the gradients on")
    parser.add_argument("--formats", action="store_true", help="measure raw vs chat prompts' reward spread")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.formats:
        import tempfile

        from .jobs import one_thread

        one_thread()
        work = Path(args.out or tempfile.mkdtemp(prefix="exoalign-formats-"))
        for fmt, st in format_spread(args.model, args.prompts, args.k, args.tokens, args.seed, work).items():
            print(fmt + ": " + ", ".join(f"{key} {v:.3f}" for key, v in st.items()))
        return 0
    for key, value in first_update_cosines(Path(args.out), args.groups).items():
        print(f"{key}: {value:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
