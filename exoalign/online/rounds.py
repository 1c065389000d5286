"""Online training (``online.rounds >= 1``): rounds of sample → score → correct around the one training loop.

Round ``r`` covers optimizer steps ``r·S + 1 … (r + 1)·S`` (``S = online.steps_per_round``):

1. prompts: the next ``prompts_per_round`` of a seeded shuffle of ``data.train_file``'s prompts;
2. ``K`` completions per prompt from the current policy π_t, by ``exoalign sample``'s :class:`HFSampler`
   (per-completion seeds, stream ``online-round{r}``; full distribution at ``online.temperature``);
3. rewards from the oracle or reward model (``exoalign score``'s judges);
4. ``log μ(y)``: π_t's log-probs of exactly the sampled ids at the sampling temperature (the distribution
   sampled; reported by the sampler with its draws), and ``log π_sft(y)`` at the loss temperature;
5. :func:`~exoalign.losses.online_targets` turns them into the corrected reference
   ``log π_sft + (log μ − log π_sft)/β_π``, targets ``log q = log_softmax(r/β_r − (log μ − log π_sft))`` and,
   for rloo and ppo, the KL-shaped reward (ppo also gets ``log μ`` for its ratio π_θ/π_t); the groups carry them
   into ``compute_loss`` (no loss formula here);
6. ``S`` steps of :func:`~exoalign.train.engine.fit` on the round's groups.

The loop sees one dataset, :class:`RoundData`, of ``S × grad_accum × batch_size`` items cycling over the round's
groups, so one round is one epoch of the loop and ``trainer_state.json``'s (epoch, position) says where in which
round a checkpoint stands. The loop's ``after_step`` hook refills it at the end of each round, before that
step's checkpoint is written, and returns the round's metrics (``online/*``, one record per round).

Exact resume: each round's samples, rewards and log-probs are written to ``output_dir/online/round-{r}.json``
(atomically) before any checkpoint of that round exists; a resumed run loads the file of the round its
checkpoint is in instead of sampling again (the policy has moved since). Sampling uses its own seeded streams,
never the global RNG, whose state the checkpoints restore.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..data import GroupCollator, TokenizedData, tokenize_rows
from ..errors import ConfigError, InputError
from ..fileio import atomic_json
from ..losses import ess, masked_log_softmax, online_targets
from ..rewards import JudgeSettings, judge_texts, make_judge
from ..sampling import HFSampler, SamplingSettings, load_prompts, summed_logps
from ..train.checkpoint import STATE_FILE
from ..train.config import TrainConfig, check_runnable
from ..train.engine import Job, evaluate, finished_state, fit, preflight
from ..train.prepare import load_reference
from ..train.refcache import compute_table
from ..train.setup import load_model, load_tok, make_accelerator, prepare_source
from ..train.step import compute_loss, grouped_logps, is_peft

logger = logging.getLogger(__name__)


class RoundData:
    """The loop's training data: ``size`` items cycling over the current round's groups (refilled each round)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.features: list[dict[str, Any]] = []

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.features[i % len(self.features)]


class OnlineCollator(GroupCollator):
    """:class:`GroupCollator` plus the online groups' ``target_logprobs``, ``shaped_rewards`` and ``sampler_logps``
    ``[B, K]``."""

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = super().__call__(features)
        K = batch["group_mask"].shape[1]
        for key in ("target_logprobs", "shaped_rewards", "sampler_logps"):
            batch[key] = self._per_slot([f[key] for f in features], K)
        return batch


def round_prompts(n: int, per_round: int, seed: int, r: int) -> list[int]:
    """Prompt indices of round ``r``: consecutive chunks of per-pass shuffles of ``range(n)`` seeded by (seed, pass)."""
    out: list[int] = []
    start = r * per_round
    while len(out) < per_round:
        epoch, offset = divmod(start + len(out), n)
        order = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        out.extend(order[offset : offset + per_round - len(out)])
    return out


@torch.no_grad()
def policy_table(model: torch.nn.Module, features: list[dict], pad_id: int, *, batch_size: int, temperature: float,
                 prefix_sharing: bool = False) -> torch.Tensor:
    """Summed log-probs ``[N, K]`` of every completion of ``features`` under ``model`` as it is (adapters on)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    collate, out = GroupCollator(pad_id), []
    for s in range(0, len(features), batch_size):
        batch = {k: v.to(device) for k, v in collate(features[s : s + batch_size]).items()}
        out.append(grouped_logps(model, batch, temperature, prefix_sharing)[0].float().cpu())  # (b, K)
    model.train(was)
    return torch.cat(out)


def round_features(record: dict, beta_pi: float, beta_r: float) -> tuple[list[dict], dict[str, float]]:
    """The round's groups as loop features (corrected reference, targets, shaped rewards, the sampler's log-probs)
    and its sample metrics."""
    rewards = torch.tensor(record["rewards"], dtype=torch.float64)  # (N, K)
    mu = torch.tensor(record["sampler_logps"], dtype=torch.float64)  # (N, K) log μ at the sampling temperature
    sft = torch.tensor(record["sft_logps"], dtype=torch.float64)  # (N, K) log π_sft at the loss temperature
    ot = online_targets(rewards, mu, sft, beta_pi, beta_r)
    features = [
        {"index": n, "prompt_ids": record["prompt_ids"][n], "completion_ids": record["completion_ids"][n],
         "rewards": record["rewards"][n], "ref_logps": ot.ref_logps[n].tolist(),
         "target_logprobs": ot.target_logprobs[n].tolist(), "shaped_rewards": ot.shaped_rewards[n].tolist(),
         "sampler_logps": record["sampler_logps"][n]}
        for n in range(len(record["prompt_ids"]))
    ]
    lengths = [len(c) for g in record["completion_ids"] for c in g]
    metrics = {
        "online/round": record["round"],
        "online/reward": float(rewards.mean()),
        "online/reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        # mean of log μ − log π_sft over samples of μ: the k1 estimate of KL(π_t ‖ π_sft)
        "online/kl": float((mu - sft).mean()),
        "online/ess": float(ess(ot.target_logprobs).mean()),  # of the corrected targets q, fraction of K
        "online/length": sum(lengths) / len(lengths),
        "online/finished": sum(map(bool, (f for g in record["finished"] for f in g))) / len(lengths),
    }
    return features, metrics


class Rounds:
    """Samples, scores and corrects the rounds; holds the loop's :class:`RoundData` and its hooks."""

    def __init__(self, cfg: TrainConfig, acc: Any, model: torch.nn.Module, ref: torch.nn.Module, tokenizer: Any,
                 judge: Any, prompts: list[str], prompt_ids: list[list[int]], out: Path) -> None:
        self.cfg, self.on, self.acc = cfg, cfg.online, acc
        self.model, self.ref, self.tok = model, ref, tokenizer
        self.prompts, self.prompt_ids, self.dir = prompts, prompt_ids, out / "online"
        self.S, self.total = self.on.steps_per_round, self.on.rounds * self.on.steps_per_round
        args = cfg.train
        self.data = RoundData(self.S * args.grad_accum * args.batch_size)
        self.collate = OnlineCollator(tokenizer.pad_token_id)
        self.batch_size = args.ref_batch_size or args.batch_size
        self.settings = SamplingSettings(
            temperature=self.on.temperature, top_k=0, top_p=1.0, max_new_tokens=self.on.max_new_tokens,
            min_new_tokens=0, max_prompt_length=cfg.data.max_prompt_length, seed=args.seed,
            batch_size=self.on.generation_batch_size, backend="hf",
        )
        self.judge = judge
        self.judge_name = f"oracle {self.on.oracle}" if self.on.oracle else f"reward model {self.on.reward_model}"
        self.metrics: dict[str, float] = {}

    def path(self, r: int) -> Path:
        return self.dir / f"round-{r:05d}.json"

    # ---------------------------------------------------------------------------------- one round
    def sample(self, r: int) -> dict:
        """Round ``r``'s record: prompts, sampled ids and texts, rewards, log μ and log π_sft; written to disk."""
        idx = round_prompts(len(self.prompts), self.on.prompts_per_round, self.cfg.train.seed, r)
        pids = [self.prompt_ids[i] for i in idx]
        sampler = HFSampler(self.model, self.tok, self.settings, stream=f"online-round{r}")
        was = self.model.training
        self.model.eval()
        groups = []
        for s in range(0, len(idx), self.on.generation_batch_size):
            groups += sampler.generate(pids[s : s + self.on.generation_batch_size],
                                       idx[s : s + self.on.generation_batch_size], self.on.k)
        self.model.train(was)
        k = self.on.k
        flat = judge_texts(self.judge, [self.prompts[i] for i in idx for _ in range(k)],
                           [c.text for g in groups for c in g], self.cfg.online.generation_batch_size * k,
                           self.judge_name)
        feats = [{"index": n, "prompt_ids": p, "completion_ids": [c.ids for c in g], "rewards": None}
                 for n, (p, g) in enumerate(zip(pids, groups))]
        ps = self.cfg.train.prefix_sharing
        # The distribution sampled: the current policy at the sampling temperature, on exactly the sampled ids.
        # The sampler reports them (log-probs of its own draws, from the decode it ran anyway); a forward pass
        # computes them when it does not.
        reported = summed_logps(groups)
        mu = torch.tensor(reported, dtype=torch.float64) if reported is not None else policy_table(
            self.model, feats, self.tok.pad_token_id, batch_size=self.batch_size, temperature=self.on.temperature,
            prefix_sharing=ps)  # (N, K)
        sft = compute_table(self.acc, self.ref, TokenizedData(feats), self.tok.pad_token_id,
                            batch_size=self.batch_size, temperature=self.cfg.loss.temperature,
                            desc=f"π_sft log-probs (round {r})")  # (N, K)
        record = {
            "round": r, "prompt_index": idx, "prompts": [self.prompts[i] for i in idx], "prompt_ids": pids,
            "completion_ids": [[c.ids for c in g] for g in groups], "completions": [[c.text for c in g] for g in groups],
            "finished": [[c.finished for c in g] for g in groups],
            "rewards": [flat[n * k : (n + 1) * k] for n in range(len(idx))],
            "sampler_logps": mu.tolist(), "sft_logps": sft.tolist(),
        }
        atomic_json(self.path(r), record)
        return record

    def load(self, r: int) -> dict:
        """The record of round ``r`` written by the interrupted run (a resumed round reuses its samples)."""
        path = self.path(r)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read the samples of round {r} to resume it ({type(e).__name__})",
                             file=str(path), field="train.resume",
                             fix="resume with the config the run was started with (a finished run cannot get more "
                                 "rounds: start a new one from its final model), or start a new run") from None
        if record.get("round") != r or len(record.get("prompt_ids", [])) != self.on.prompts_per_round:
            raise InputError(f"holds other samples than round {r} of this config", file=str(path),
                             field="train.resume", fix="resume with the config the run was started with")
        return record

    def use(self, record: dict) -> None:
        """Make ``record`` the loop's current round."""
        self.data.features, self.metrics = round_features(record, self.cfg.loss.beta_pi, self.cfg.loss.beta_r)

    # ------------------------------------------------------------------------------------- hooks
    def loss_fn(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return compute_loss(model, batch, self.cfg.loss, None, prefix_sharing=self.cfg.train.prefix_sharing)

    def end_metrics(self) -> dict[str, float]:
        """The finished round's loss and ESS of the policy side p on its groups, under the trained policy."""
        feats, bs, device = self.data.features, self.batch_size, self.acc.device
        batches = [{k: v.to(device) for k, v in self.collate(feats[s : s + bs]).items()} for s in range(0, len(feats), bs)]
        loss = evaluate(self.acc, self.model, batches, self.loss_fn)["eval/loss"]  # type: ignore[arg-type]
        policy = policy_table(self.model, feats, self.tok.pad_token_id, batch_size=bs,
                              temperature=self.cfg.loss.temperature, prefix_sharing=self.cfg.train.prefix_sharing)
        ref = torch.tensor([f["ref_logps"] for f in feats], dtype=torch.float64)  # (N, K)
        log_p = masked_log_softmax(self.cfg.loss.beta_pi * (policy.double() - ref), None)  # (N, K)
        return {"online/loss": loss, "online/ess_policy": float(ess(log_p).mean())}

    def after_step(self, step: int) -> dict[str, float] | None:
        """At the end of a round: its metrics, and (unless it was the last) the next round's groups."""
        if step % self.S:
            return None
        metrics = {**self.metrics, **self.end_metrics()}
        if self.acc.is_main_process:
            logger.info("online round %d: %s", step // self.S - 1,
                        ", ".join(f"{k.split('/')[1]}={v:.4g}" for k, v in metrics.items() if k != "online/round"))
        if step < self.total:
            self.use(self.sample(step // self.S))
        return metrics


def _resume_step(resume_from: Path | None, out: Path, resume: bool) -> int:
    """The step a (resumed) run starts from: its last checkpoint's, a run that ended's, else 0."""
    if resume_from is not None:
        return int(json.loads((resume_from / STATE_FILE).read_text(encoding="utf-8"))["step"])
    ended = finished_state(out) if resume else None
    return ended["step"] if ended else 0


def train_online(cfg: TrainConfig, callbacks: Sequence[Any] = ()) -> Path:
    """Run ``exoalign train`` with ``online.rounds >= 1``; returns ``output_dir/final`` (from_pretrained loads it).
    ``callbacks`` as the Trainer's (``on_round_end`` gets each round's ``online/*`` metrics)."""
    check_runnable(cfg)
    on = cfg.online
    if on.rounds < 1:
        raise ConfigError("train_online needs online.rounds >= 1", field="online.rounds", fix="set online.rounds=2")
    S = on.steps_per_round
    # The run is rounds × S steps, checkpointed every save_every steps as offline; a checkpoint anywhere in round r
    # resumes exactly from round-r's file (written before any checkpoint of the round).
    args = replace(cfg.train, max_steps=on.rounds * S)
    cfg = replace(cfg, train=args)
    resume_from = preflight(args, warn=False)
    acc = make_accelerator(args)
    if acc.num_processes > 1:
        raise ConfigError("online training runs in one process for now", field="online.rounds",
                          fix="run it without accelerate launch / torchrun (one GPU or the CPU)")
    if cfg.loss.name == "rloo" and args.batch_size * args.grad_accum * S > on.prompts_per_round:
        logger.warning("rloo uses each sample more than once per round (batch_size × grad_accum × steps_per_round "
                       "> prompts_per_round): its gradient is only unbiased on a sample's first use (ppo's clipped "
                       "ratio is made for reuse)")
    out = Path(args.output_dir)
    scratch = cfg.model.init == "scratch"
    tokenizer = None if scratch else load_tok(cfg.model, cfg.model.name_or_path)
    d = cfg.data
    prompts = load_prompts(d.train_file, split=d.split, tokenizer=tokenizer, dedupe=True, limit=None,
                           columns=d.columns, preset=d.preset)
    if on.prompts_per_round > len(prompts):
        raise ConfigError(f"asks for {on.prompts_per_round} prompts per round but {d.train_file} has "
                          f"{len(prompts)} distinct prompts", field="online.prompts_per_round",
                          fix=f"set online.prompts_per_round <= {len(prompts)} or give more prompts")
    # The judge is loaded before anything is written: a bad oracle spec leaves no files behind.
    judge = make_judge(JudgeSettings(oracle=on.oracle, reward_model=on.reward_model), device=str(acc.device))
    source = prepare_source(acc, cfg.model, output_dir=out, texts=prompts, max_length=d.max_length,
                            seed=args.seed, resume=args.resume)
    if tokenizer is None:
        tokenizer = load_tok(cfg.model, source)
    prompt_rows = [{"prompt": p, "completions": []} for p in prompts]
    prompt_ids = [f["prompt_ids"] for f in tokenize_rows(prompt_rows, tokenizer, max_length=d.max_length,
                                                         max_prompt_length=d.max_prompt_length).features]
    model = load_model(cfg.model, source).to(acc.device)
    # π_sft: the LoRA base under the adapters, else a frozen copy of the starting (or the named) model.
    if cfg.model.ref_name_or_path is None and is_peft(model):
        ref = model
    else:
        ref = load_reference(cfg, cfg.model.ref_name_or_path or source).to(acc.device)

    rounds = Rounds(cfg, acc, model, ref, tokenizer, judge, prompts, prompt_ids, out)
    step = _resume_step(resume_from, out, args.resume)
    r = min(step // S, on.rounds - 1)
    rounds.use(rounds.sample(0) if step == 0 else rounds.load(r))
    if step and acc.is_main_process:
        logger.info("online: resuming in round %d at step %d with the round's saved samples", r, step)
    info = {"model_source": source, "num_processes": acc.num_processes, "prompts": len(prompts),
            "online": {"rounds": on.rounds, "steps": on.rounds * S, "save_every": args.save_every}}
    job = Job(model=model, tokenizer=tokenizer, train_data=rounds.data, collate=rounds.collate,
              loss_fn=rounds.loss_fn, config=cfg, info=info, after_step=rounds.after_step, callbacks=callbacks)
    return fit(acc, args, job)
