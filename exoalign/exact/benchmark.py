"""The exact-optimum benchmark (``exoalign bench exact``): how close does each method get to π*_β?

On an enumerable sequence task (``V^L`` completions per prompt) the optimum of the alignment objective,
``π*_β ∝ π_sft e^{r/β}``, and every metric of every policy are exact sums, so methods can be ranked by the
normalised optimality gap ``(J(π*) − J(π)) / (J(π*) − J(π_sft)) = KL(π‖π*) / KL(π_sft‖π*)`` without any
estimation noise in the evaluation. The trained methods call the library's loss registry
(``get_loss`` + ``pref_targets``/``reward_targets``) on sequence log-probs summed over tokens, exactly as a
user's training run does. See ``docs/exact_benchmark.md`` and the modules:

* ``problem`` — task, GRU policy, enumeration, SFT fit
* ``metrics`` — exact metrics, π*, analytic best-of-N
* ``train`` — offline data and training of each method
* ``online`` — the online methods: sampling from the current policy, corrected targets, reuse
* ``toy`` — the one-dimensional illustration
* ``report`` — results.json, results.md and the PNGs

β convention (DESIGN.md): the losses see ``p = softmax(β_π h)`` and ``q = softmax(r/β_r)`` (or Bradley–Terry
labels at temperature β_r), so their optimum is π*_β with ``β = β_π β_r``. The benchmark uses ``β_π = 1``
by default: only then does the EXO gradient tend to the RL gradient of ``J_β`` as K → ∞ for a policy that
cannot represent π* (for β_π ≠ 1 it tends to the reverse KL of ``π_sft^{1−β_π} π_θ^{β_π}`` instead).
"""

from __future__ import annotations

import dataclasses
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import require
from .metrics import METRICS, best_of_n_logps, exact_metrics, optimum_logps
from .problem import SeqPolicy, SeqTaskSpec, all_sequences, build_task, fit_sft
from .toy import ToySpec, run_toy
from .train import policy_table, sample_offline, train_method, trained_methods


@dataclass
class ExactConfig:
    """Settings of the exact-optimum benchmark (``--quick`` swaps in :data:`QUICK`)."""

    seed: int = 0
    """Base seed: the task and π_sft are drawn from it; the offline data of seed i uses seed + i."""
    beta: float = 0.5
    """KL coefficient β of J_β = E r − β KL(π‖π_sft); the losses get β_π = beta_pi and β_r = β/β_π."""
    beta_pi: float = 1.0
    """β_π of the losses (p = softmax(β_π h)); 1 makes EXO-rw tend to the RL gradient as K grows."""
    eps: float = 1e-3
    """Label smoothing ε of the preference targets [1−ε, ε] (exo-pref, dpo-pref)."""
    vocab: int = 8
    """Tokens per position V."""
    length: int = 5
    """Completion length L; V^L completions per prompt are enumerated (at most 65536)."""
    prompts: int = 4
    """Number of prompts."""
    hidden: int = 4
    """GRU hidden width of the policy: small, so that it cannot represent π* exactly."""
    embed: int = 16
    """Token and prompt embedding width."""
    sft_steps: int = 300
    """Adam steps of the exact maximum-likelihood fit of π_sft to the multimodal SFT distribution."""
    sft_lr: float = 0.03
    """Learning rate of the SFT fit."""
    pool: int = 4096
    """Offline completions per prompt sampled from π_sft (pref methods get pool/2 labelled pairs of them)."""
    batch: int = 256
    """Completions per training step for every method (batch/K groups of K, or batch/2 pairs)."""
    steps: int = 1000
    """Training steps, the same for every method."""
    lr: float = 0.01
    """Adam learning rate (cosine-decayed to 0), the same for every method."""
    seeds: int = 5
    """Offline datasets (and minibatch orders) per trained method."""
    ks: list[int] = field(default_factory=lambda: [2, 4, 8, 32])
    """Group sizes K of the rw and online methods (32 shows the trend towards rl-exact as K grows)."""
    reuse: list[int] = field(default_factory=lambda: [1, 4])
    """Online methods: steps per sampled round; R > 1 adds methods with suffix -r{R} ([] = no online methods)."""
    online_seeds: int = 3
    """Seeds of the online methods: the first min(online_seeds, seeds) of the offline seeds (0 = all); fewer
    keeps the full run near 30 min on 2 busy cores."""
    best_of_n: list[int] = field(default_factory=lambda: [4, 16, 64])
    """N of the analytic best-of-N references."""
    eval_every: int = 50
    """Steps between exact evaluations for the gap curves."""
    toy_steps: int = 600
    """Training steps of the 1-D illustration."""

    def __post_init__(self) -> None:
        import math

        for name in ("beta", "beta_pi", "lr", "sft_lr"):
            v = getattr(self, name)
            require(isinstance(v, (int, float)) and math.isfinite(v) and v > 0, name, f"must be > 0, got {v!r}",
                    "use a positive number, e.g. --beta 0.5")
        require(0.0 < self.eps < 0.5, "eps", f"must be in (0, 0.5), got {self.eps!r}", "use 1e-3")
        require(self.vocab >= 2 and self.length >= 1, "vocab", "need vocab ≥ 2 and length ≥ 1", "use vocab=8 length=5")
        require(self.vocab**self.length <= 65536, "length", f"V^L = {self.vocab ** self.length} is too many to enumerate",
                "keep vocab**length ≤ 65536")
        require(all(isinstance(r, int) and r >= 1 for r in self.reuse) and len(set(self.reuse)) == len(self.reuse),
                "reuse", f"steps per round must be distinct integers ≥ 1, got {self.reuse}", "use e.g. [1, 4]")
        require(isinstance(self.online_seeds, int) and self.online_seeds >= 0, "online_seeds",
                f"must be an integer ≥ 0, got {self.online_seeds!r}", "use 0 (= seeds) or e.g. 3")
        for name in ("prompts", "hidden", "embed", "steps", "seeds", "eval_every", "toy_steps"):
            require(getattr(self, name) >= 1, name, f"must be ≥ 1, got {getattr(self, name)!r}", "use a positive integer")
        require(self.sft_steps >= 0, "sft_steps", "must be ≥ 0", "use e.g. 300")
        require(self.pool >= 2 and self.pool % 2 == 0, "pool", f"must be an even number ≥ 2, got {self.pool}",
                "use e.g. 1024")
        require(len(self.ks) > 0 and all(k >= 2 for k in self.ks), "ks", f"group sizes must be ≥ 2, got {self.ks}",
                "use e.g. [2, 4, 8]")
        require(all(self.batch % k == 0 for k in [2, *self.ks]) and self.batch > 0, "batch",
                f"batch {self.batch} must be a multiple of 2 and of every K in {self.ks}", "use e.g. 64")
        require(all(n >= 1 for n in self.best_of_n), "best_of_n", f"N must be ≥ 1, got {self.best_of_n}",
                "use e.g. [4, 16, 64]")

    @property
    def beta_r(self) -> float:
        return self.beta / self.beta_pi


#: ``--quick``: a 4096-completion space, 2 prompts, 1 seed, short training (< 60 s on 2 cores).
QUICK = dict(length=4, prompts=2, sft_steps=150, pool=256, batch=64, steps=150, seeds=1, ks=[2, 4, 8], reuse=[1, 4],
             eval_every=25,
             toy_steps=200)


def _versions() -> dict[str, str]:
    import matplotlib
    import numpy

    from .. import __version__

    return {"exoalign": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "matplotlib": matplotlib.__version__, "python": platform.python_version()}


def _mean_record(runs: list[dict[str, float]], curves: list[list[tuple[int, float]]]) -> dict:
    """Mean of each metric (and of the training ESS where recorded) over seeds, the per-seed values and the
    mean gap curve."""
    keys = [*METRICS, *(k for k in ("ess", "ess_q") if all(k in r for r in runs))]
    rec: dict = {m: sum(r[m] for r in runs) / len(runs) for m in keys}
    rec["seeds"] = len(runs)
    if len(runs) > 1:
        rec["gap_std"] = float(torch.tensor([r["gap"] for r in runs], dtype=torch.float64).std().item())
    rec["per_seed"] = {m: [r[m] for r in runs] for m in keys}
    if curves:
        rec["curve"] = [[s, sum(c[i][1] for c in curves) / len(curves)] for i, (s, _) in enumerate(curves[0])]
    return rec


def _setup(cfg: ExactConfig, progress: bool) -> tuple[SeqTaskSpec, SeqPolicy, float, torch.Tensor, torch.Tensor]:
    """The task of ``cfg.seed`` and its π_sft: ``(spec, sft_policy, sft_fit_kl, sft_logps [P, N] float64,
    rewards [P, N])``; deterministic, so a later call rebuilds the same π_sft."""
    spec = SeqTaskSpec(vocab=cfg.vocab, length=cfg.length, prompts=cfg.prompts, seed=cfg.seed)
    task = build_task(spec)
    torch.manual_seed(cfg.seed)
    sft_policy = SeqPolicy(cfg.vocab, cfg.length, cfg.prompts, hidden=cfg.hidden, embed=cfg.embed)
    sft_fit_kl = fit_sft(sft_policy, task.sft_probs, cfg.sft_steps, lr=cfg.sft_lr, progress=progress)
    return spec, sft_policy, sft_fit_kl, policy_table(sft_policy, cfg.prompts), task.rewards


def _train_online_rows(cfg: ExactConfig, methods: list, sft_policy: SeqPolicy, sft_logps: torch.Tensor,
                       rewards: torch.Tensor, train_kw: dict, bar) -> dict[str, dict]:
    """Every online method in ``methods`` on the online seeds; ``{name: mean record}``."""
    online_seeds = min(cfg.online_seeds or cfg.seeds, cfg.seeds)
    out = {}
    for m in methods:
        runs, curves = [], []
        for i in range(online_seeds):
            bar.set_postfix_str(f"{m.name} seed {cfg.seed + i}")
            # online methods draw their rounds from the seed alone (they never see the offline data)
            policy, curve, stats = train_method(m, sft_policy, sft_logps, rewards, None, seed=cfg.seed + i, **train_kw)
            runs.append(exact_metrics(policy_table(policy, cfg.prompts), sft_logps, rewards, cfg.beta) | stats)
            curves.append(curve)
        out[m.name] = _mean_record(runs, curves)
    return out


def add_online_rows(results: dict, losses: list[str], *, progress: bool = True) -> dict:
    """Train the online methods of registry ``losses`` (e.g. ``["ppo"]``) with the settings of an existing
    ``results.json`` document and add their rows to it (in place; returned).

    π_sft is rebuilt from the recorded settings and must reproduce the recorded ``sft_fit_kl`` exactly (else
    :class:`ConfigError`: the rows would not be comparable). Each online run depends only on its method and
    seed, so the added rows are the rows a full run of the same code would have written. The run's wall time,
    versions and the methods added go to ``config["added"]``.
    """
    from ..errors import ConfigError

    t0 = time.perf_counter()
    names = {f.name for f in dataclasses.fields(ExactConfig)}
    cfg = ExactConfig(**{k: v for k, v in results["config"].items() if k in names})
    _, sft_policy, sft_fit_kl, sft_logps, rewards = _setup(cfg, progress)
    if sft_fit_kl != results["config"]["sft_fit_kl"]:
        raise ConfigError(f"π_sft rebuilt with sft_fit_kl {sft_fit_kl!r}, the results have "
                          f"{results['config']['sft_fit_kl']!r}", field="sft_fit_kl",
                          fix="add rows with the torch version and code that wrote the results, or run the whole "
                              "benchmark again")
    methods = [m for m in trained_methods(tuple(cfg.ks), tuple(cfg.reuse)) if m.targets == "online" and m.loss in losses]
    online_seeds = min(cfg.online_seeds or cfg.seeds, cfg.seeds)
    bar = tqdm(total=cfg.steps * len(methods) * online_seeds, desc="bench exact (rows)", disable=not progress,
               unit="step")
    train_kw = dict(beta=cfg.beta, beta_r=cfg.beta_r, eps=cfg.eps, steps=cfg.steps, batch=cfg.batch, lr=cfg.lr,
                    eval_every=cfg.eval_every, tick=lambda: bar.update(1))
    results["methods"].update(_train_online_rows(cfg, methods, sft_policy, sft_logps, rewards, train_kw, bar))
    bar.close()
    results["config"].setdefault("added", []).append(
        {"methods": [m.name for m in methods], "versions": _versions(), "wall_s": round(time.perf_counter() - t0, 1)})
    return results


def run_benchmark(cfg: ExactConfig, *, progress: bool = True) -> tuple[dict, dict]:
    """Run the whole benchmark; return ``(results, illustration)``.

    ``results`` is the ``results.json`` document ``{"config": {...}, "methods": {name: {gap, J, kl_to_opt,
    kl_from_opt, reward, kl_to_sft, seeds, …}}}``; ``illustration`` holds the 1-D distributions and metrics.
    """
    t0 = time.perf_counter()
    spec, sft_policy, sft_fit_kl, sft_logps, rewards = _setup(cfg, progress)
    opt_logps = optimum_logps(sft_logps, rewards, cfg.beta)
    seqs = all_sequences(cfg.vocab, cfg.length)  # (N, L)

    methods = trained_methods(tuple(cfg.ks), tuple(cfg.reuse))
    data_methods = [m for m in methods if m.targets not in ("exact", "online")]
    online = [m for m in methods if m.targets == "online"]
    exact_refs = [m for m in methods if m.targets == "exact"]
    online_seeds = min(cfg.online_seeds or cfg.seeds, cfg.seeds)
    total = cfg.steps * (len(data_methods) * cfg.seeds + len(online) * online_seeds + len(exact_refs))
    bar = tqdm(total=total, desc="bench exact", disable=not progress, unit="step")
    train_kw = dict(beta=cfg.beta, beta_r=cfg.beta_r, eps=cfg.eps, steps=cfg.steps, batch=cfg.batch, lr=cfg.lr,
                    eval_every=cfg.eval_every, tick=lambda: bar.update(1))

    out: dict[str, dict] = {
        "sft": _mean_record([exact_metrics(sft_logps, sft_logps, rewards, cfg.beta)], []),
        "optimum": _mean_record([exact_metrics(opt_logps, sft_logps, rewards, cfg.beta)], []),
    }
    # the exact references are deterministic (no data, same start): one run each
    for m in exact_refs:
        bar.set_postfix_str(m.name)
        policy, curve, _ = train_method(m, sft_policy, sft_logps, rewards, None, seed=cfg.seed, **train_kw)
        out[m.name] = _mean_record([exact_metrics(policy_table(policy, cfg.prompts), sft_logps, rewards, cfg.beta)],
                                   [curve])
    for n in cfg.best_of_n:
        out[f"best-of-n-{n}"] = _mean_record([exact_metrics(best_of_n_logps(sft_logps, rewards, n), sft_logps,
                                                            rewards, cfg.beta)], [])
    runs: dict[str, list] = {m.name: [] for m in data_methods}
    curves: dict[str, list] = {m.name: [] for m in data_methods}
    for i in range(cfg.seeds):
        seed = cfg.seed + i
        data = sample_offline(sft_logps, rewards, seqs, cfg.pool, cfg.beta_r, torch.Generator().manual_seed(seed))
        for m in data_methods:
            bar.set_postfix_str(f"{m.name} seed {seed}")
            policy, curve, stats = train_method(m, sft_policy, sft_logps, rewards, data, seed=seed, **train_kw)
            runs[m.name].append(exact_metrics(policy_table(policy, cfg.prompts), sft_logps, rewards, cfg.beta)
                                | stats)
            curves[m.name].append(curve)
    for m in data_methods:
        out[m.name] = _mean_record(runs[m.name], curves[m.name])
    out.update(_train_online_rows(cfg, online, sft_policy, sft_logps, rewards, train_kw, bar))
    bar.close()

    toy = run_toy(ToySpec(steps=cfg.toy_steps, seed=cfg.seed, beta_pi=cfg.beta_pi))
    config = dataclasses.asdict(cfg) | {
        "beta_r": cfg.beta_r,
        "completions_per_prompt": spec.size,
        "policy_params": sum(p.numel() for p in sft_policy.parameters()),
        "sft_fit_kl": sft_fit_kl,
        "seed_list": [cfg.seed + i for i in range(cfg.seeds)],
        "online_seed_list": [cfg.seed + i for i in range(online_seeds)],
        "optimizer": "Adam, cosine decay to 0",
        "versions": _versions(),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    return {"config": config, "methods": out}, toy


def write_outputs(results: dict, toy: dict, out_dir: str | Path) -> list[Path]:
    """Write results.json, results.md, illustration.json and the PNGs into ``out_dir`` (atomically)."""
    from .report import write_all

    return write_all(results, toy, Path(out_dir))
