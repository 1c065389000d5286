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
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..data import GroupCollator, TokenizedData, tokenize_rows
from ..errors import ConfigError, InputError
from ..eval.heldout import HeldOut, metrics_of, shard
from ..fileio import atomic_json
from ..losses import ess, masked_log_softmax, online_targets
from ..rewards import JudgeSettings, judge_texts, make_judge
from ..sampling import HFSampler, SamplingSettings, load_prompts, summed_logps
from ..train.config import TrainConfig, check_round_slots, check_runnable
from ..train.engine import Job, fit, preflight
from ..train.prepare import load_reference
from ..train.refcache import compute_table
from ..train.setup import load_model, load_tok, make_accelerator, prepare_source
from ..train.step import compute_loss, grouped_logps, is_peft
from ..train.summary import report
from .colocated import online_backend
from .heldout import heldout_prompts, make_heldout, resume_step, start_heldout

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


def policy_passes(model: torch.nn.Module, features: list[dict], collate: Any, *, batch_size: int, temperature: float,
                  prefix_sharing: bool = False) -> Iterator[tuple[dict, tuple[torch.Tensor, torch.Tensor]]]:
    """``(batch, (summed log-probs, lengths))`` of each batch of ``features`` under ``model`` as it is (adapters
    on), in eval mode and without gradients; the model's mode is restored at the end."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for s in range(0, len(features), batch_size):
            batch = {k: v.to(device) for k, v in collate(features[s : s + batch_size]).items()}
            with torch.no_grad():
                logps = grouped_logps(model, batch, temperature, prefix_sharing)  # (b, K), (b, K)
            yield batch, logps
    finally:
        model.train(was)


def policy_table(model: torch.nn.Module, features: list[dict], pad_id: int, *, batch_size: int, temperature: float,
                 prefix_sharing: bool = False) -> torch.Tensor:
    """Summed log-probs ``[N, K]`` of every completion of ``features`` under ``model`` as it is (adapters on)."""
    return torch.cat([lp.float().cpu() for _, (lp, _) in policy_passes(
        model, features, GroupCollator(pad_id), batch_size=batch_size, temperature=temperature,
        prefix_sharing=prefix_sharing)])


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
                 judge: Any, prompts: list[str], prompt_ids: list[list[int]], out: Path, backend: str = "hf",
                 heldout: HeldOut | None = None, source: str = "") -> None:
        self.cfg, self.on, self.acc = cfg, cfg.online, acc
        self.model, self.ref, self.tok = model, ref, tokenizer
        self.prompts, self.prompt_ids, self.dir = prompts, prompt_ids, out / "online"
        self.S, self.total = self.on.steps_per_round, self.on.rounds * self.on.steps_per_round
        args = cfg.train
        # One round is one epoch of the loop at the global batch (accelerate shards each step's batch over processes).
        self.data = RoundData(self.S * args.grad_accum * args.batch_size * acc.num_processes)
        self.collate = OnlineCollator(tokenizer.pad_token_id)
        self.batch_size = args.ref_batch_size or args.batch_size
        self.settings = SamplingSettings(
            temperature=self.on.temperature, top_k=0, top_p=1.0, max_new_tokens=self.on.max_new_tokens,
            min_new_tokens=0, max_prompt_length=cfg.data.max_prompt_length, seed=args.seed,
            batch_size=self.on.generation_batch_size, backend=backend,
            gpu_memory_utilization=self.on.gpu_memory_utilization, sample_dtype=self.on.sample_dtype,
        )
        self.backend, self.vllm = backend, None  # the vLLM engine is built at the first round that samples
        self.judge = judge
        self.judge_name = f"oracle {self.on.oracle}" if self.on.oracle else f"reward model {self.on.reward_model}"
        self.metrics: dict[str, float] = {}
        self.heldout = heldout
        self.source = source  # the starting model's directory: the vLLM engine is built from it

    def path(self, r: int) -> Path:
        return self.dir / f"round-{r:05d}.json"

    # ---------------------------------------------------------------------------------- one round
    def sampler(self, r: int) -> Any:
        """Round ``r``'s sampler: HF ``generate`` on the policy, or the colocated vLLM engine with the policy's
        current weights pushed in."""
        if self.backend == "hf":
            return HFSampler(self.model, self.tok, self.settings, stream=f"online-round{r}")
        if self.vllm is None:
            from .colocated import ColocatedVLLM

            self.vllm = ColocatedVLLM.create(self.source, self.tok, self.settings, dtype=self.cfg.model.dtype,
                                             num_processes=self.acc.num_processes,
                                             trust_remote_code=self.cfg.model.trust_remote_code)
        self.vllm.push(self.model)
        return self.vllm.at_round(r)

    def _sample_shard(self, r: int, idx: list[int]) -> dict[str, list]:
        """This process's part of round ``r``: completions, rewards and log μ of prompts ``idx`` (a contiguous
        shard, so generation and log-prob batches are the ones one process would form when shards are multiples
        of the batch sizes)."""
        pids = [self.prompt_ids[i] for i in idx]
        k, gb = self.on.k, self.on.generation_batch_size
        sampler = self.sampler(r)
        was = self.model.training
        self.model.eval()
        groups = []
        for s in range(0, len(idx), gb):
            groups += sampler.generate(pids[s : s + gb], idx[s : s + gb], k)
        self.model.train(was)
        flat = judge_texts(self.judge, [self.prompts[i] for i in idx for _ in range(k)],
                           [c.text for g in groups for c in g], gb * k, self.judge_name) if idx else []
        feats = [{"index": n, "prompt_ids": p, "completion_ids": [c.ids for c in g], "rewards": None}
                 for n, (p, g) in enumerate(zip(pids, groups))]
        # The distribution sampled: the current policy at the sampling temperature, on exactly the sampled ids.
        # The HF sampler reports them (log-probs of its own draws, from the decode it ran anyway); otherwise (vLLM)
        # the training model recomputes them.
        reported = summed_logps(groups) if groups else None
        if reported is not None:
            mu = [list(map(float, row)) for row in reported]  # (n, K)
        else:
            mu = policy_table(self.model, feats, self.tok.pad_token_id, batch_size=self.batch_size,
                              temperature=self.on.temperature, prefix_sharing=self.cfg.train.prefix_sharing
                              ).tolist() if feats else []  # (n, K)
        return {"completion_ids": [[c.ids for c in g] for g in groups],
                "completions": [[c.text for c in g] for g in groups],
                "finished": [[c.finished for c in g] for g in groups],
                "rewards": [flat[n * k : (n + 1) * k] for n in range(len(idx))], "sampler_logps": mu}

    def sample(self, r: int) -> dict:
        """Round ``r``'s record: prompts, sampled ids and texts, rewards, log μ and log π_sft; written to disk.

        Each process samples, scores and takes log μ of its contiguous shard of the round's prompts; the shards
        are gathered so every process holds the whole round (the loop's sampler picks each process's batches
        from it); π_sft's log-probs are split over the processes by ``compute_table``; the main process writes."""
        idx = round_prompts(len(self.prompts), self.on.prompts_per_round, self.cfg.train.seed, r)
        part = self._sample_shard(r, [idx[i] for i in shard(len(idx), self.acc.process_index,
                                                               self.acc.num_processes)])
        parts = [part]
        if self.acc.num_processes > 1:
            from accelerate.utils import gather_object

            parts = gather_object([part])  # in process order: the shards concatenate in the round's prompt order
        whole = {key: [v for p in parts for v in p[key]] for key in part}
        pids = [self.prompt_ids[i] for i in idx]
        feats = [{"index": n, "prompt_ids": p, "completion_ids": c, "rewards": None}
                 for n, (p, c) in enumerate(zip(pids, whole["completion_ids"]))]
        sft = compute_table(self.acc, self.ref, TokenizedData(feats), self.tok.pad_token_id,
                            batch_size=self.batch_size, temperature=self.cfg.loss.temperature,
                            desc=f"π_sft log-probs (round {r})",
                            prefix_sharing=self.cfg.train.prefix_sharing)  # (N, K)
        record = {"round": r, "prompt_index": idx, "prompts": [self.prompts[i] for i in idx], "prompt_ids": pids,
                  **whole, "sft_logps": sft.tolist()}
        if self.acc.is_main_process:
            atomic_json(self.path(r), record)
        self.acc.wait_for_everyone()  # the file exists before any process goes on to a checkpoint of this round
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

    @torch.no_grad()
    def end_metrics(self) -> dict[str, float]:
        """The finished round's loss and ESS of the policy side p on its groups, under the trained policy: one
        forward pass per batch (fp32, outside autocast) gives the log-probs both are computed from."""
        feats, device, cfg = self.data.features, self.acc.device, self.cfg
        tables, sums = [], torch.zeros(2, dtype=torch.float64, device=device)  # (loss × groups, groups)
        for batch, logps in policy_passes(self.model, feats, self.collate, batch_size=self.batch_size,
                                          temperature=cfg.loss.temperature, prefix_sharing=cfg.train.prefix_sharing):
            loss, _ = compute_loss(self.model, batch, cfg.loss, None, prefix_sharing=cfg.train.prefix_sharing,
                                   logps=logps)
            n = len(batch["index"])
            sums += torch.tensor([float(loss) * n, n], dtype=torch.float64, device=device)
            tables.append(logps[0].float().cpu())
        if self.acc.num_processes > 1:  # the loss over every process's groups, as evaluate() reduces it
            sums = self.acc.reduce(sums, reduction="sum")
        loss = float(sums[0] / sums[1].clamp(min=1))
        policy = torch.cat(tables)  # (N, K) this process's groups
        ref = torch.tensor([f["ref_logps"] for f in feats], dtype=torch.float64)  # (N, K)
        log_p = masked_log_softmax(self.cfg.loss.beta_pi * (policy.double() - ref), None)  # (N, K)
        return {"online/loss": loss, "online/ess_policy": float(ess(log_p).mean())}

    def after_step(self, step: int) -> dict[str, float] | None:
        """At the end of a round: its metrics, and (unless it was the last) the next round's groups."""
        if step % self.S:
            return None
        metrics = {**self.metrics, **self.end_metrics()}
        r = step // self.S - 1
        if self.heldout is not None and (step == self.total or (self.on.eval_every and (r + 1) % self.on.eval_every == 0)):
            point = self.heldout(self.model, step)
            if point is not None:
                metrics.update(metrics_of(point))
        if self.acc.is_main_process:
            logger.info("online round %d: %s", r,
                        ", ".join(f"{k.removeprefix('online/')}={v:.4g}" for k, v in metrics.items() if k != "online/round"))
        if step < self.total:
            self.use(self.sample(step // self.S))
        return metrics


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
    check_round_slots(cfg, acc.num_processes)
    state = getattr(acc, "state", None)
    ds = getattr(state, "deepspeed_plugin", None)
    if getattr(state, "fsdp_plugin", None) is not None or getattr(ds, "zero_stage", 0) == 3:
        raise ConfigError("online rounds sample from the whole policy on each process, which FSDP and ZeRO-3 shard",
                          field="online.rounds", fix="launch with configs/accelerate/ddp.yaml or deepspeed_zero2.yaml")
    backend = online_backend(on.backend, acc.device)
    if cfg.loss.name == "rloo" and args.batch_size * args.grad_accum * S * acc.num_processes > on.prompts_per_round:
        logger.warning("rloo uses each sample more than once per round (batch_size × grad_accum × steps_per_round "
                       "> prompts_per_round): its gradient is only unbiased on a sample's first use (ppo's clipped "
                       "ratio is made for reuse)")
    out = Path(args.output_dir)
    scratch = cfg.model.init == "scratch"
    tokenizer = None if scratch else load_tok(cfg.model, cfg.model.name_or_path)
    d = cfg.data
    prompts = load_prompts(d.train_file, split=d.split, tokenizer=tokenizer, dedupe=True, limit=None,
                           columns=d.columns, preset=d.preset)
    prompts, held = heldout_prompts(prompts, cfg, tokenizer)
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
    prompt_ids = encode(prompts, tokenizer, d)
    model = load_model(cfg.model, source).to(acc.device)
    # π_sft: the LoRA base under the adapters, else a frozen copy of the starting (or the named) model.
    if cfg.model.ref_name_or_path is None and is_peft(model):
        ref = model
    else:
        ref = load_reference(cfg, cfg.model.ref_name_or_path or source).to(acc.device)

    heldout = None
    if held:
        heldout = make_heldout(cfg, acc, out, held, tokenizer, judge, model, ref, source)
    rounds = Rounds(cfg, acc, model, ref, tokenizer, judge, prompts, prompt_ids, out, backend, heldout, source)
    step = resume_step(resume_from, out, args.resume)
    r = min(step // S, on.rounds - 1)
    if heldout is not None:
        start_heldout(heldout, model, step if args.resume else None)
    rounds.use(rounds.sample(0) if step == 0 else rounds.load(r))
    if step and acc.is_main_process:
        logger.info("online: resuming in round %d at step %d with the round's saved samples", r, step)
    info = {"model_source": source, "num_processes": acc.num_processes, "prompts": len(prompts),
            "online": {"rounds": on.rounds, "steps": on.rounds * S, "save_every": args.save_every}}
    job = Job(model=model, tokenizer=tokenizer, train_data=rounds.data, collate=rounds.collate,
              loss_fn=rounds.loss_fn, config=cfg, info=info, after_step=rounds.after_step, callbacks=callbacks)
    final = fit(acc, args, job)
    if rounds.vllm is not None:
        rounds.vllm.close()
    if acc.is_main_process:
        report(out, lr=args.lr)
    return final


def encode(prompts: list[str], tokenizer: Any, d: Any) -> list[list[int]]:
    """Prompt ids as training sees them (the one encoder; truncated from the left to data.max_prompt_length)."""
    rows = [{"prompt": p, "completions": []} for p in prompts]
    return [f["prompt_ids"] for f in tokenize_rows(rows, tokenizer, max_length=d.max_length,
                                                   max_prompt_length=d.max_prompt_length).features]
