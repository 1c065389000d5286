"""``exoalign score``: fill ``rewards`` in group rows from a reward model or an oracle.

    exoalign score input=groups.jsonl output=scored.jsonl reward_model=runs/rm/final
    exoalign score input=groups.jsonl output=scored.jsonl --oracle exoalign.eval.oracles:vader_sentiment

The judges (reward models and oracles, and how a reward model reads its input) are :mod:`exoalign.rewards`.
Rows that already carry rewards are re-scored (their rewards are replaced). Resumable like ``sample``: the
output grows by whole rows; a rerun with the same settings continues after the last complete row.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..config import require, stage_args
from ..data import append_rows, load_rows, read_done_count
from ..fileio import check_meta, fingerprint, write_meta
from ..models import DTYPES, check_model_dir
from ..rewards import JudgeSettings, check_judge_given, judge_texts, make_judge


@dataclass
class ScoreConfig(JudgeSettings):
    """``exoalign score``: fill rewards in group rows from a reward model or an oracle."""

    input: str = ""
    """Group rows to score (e.g. the output of exoalign sample); pair rows are scored as groups of 2."""
    split: str = "train"
    """Split to read from a hub dataset or a DatasetDict directory."""
    output: str = ""
    """Output JSONL: the input rows with 'rewards' filled; appended to when resuming."""
    rows_per_write: int = 64
    """Rows scored between two appends to the output (the unit of progress kept after a kill)."""
    dtype: str = "float32"
    """Reward model weights dtype: float32, bfloat16, float16 or auto."""
    device: str = "auto"
    """auto (CUDA when available), cpu, cuda or cuda:N."""
    trust_remote_code: bool = False
    """Allow reward model code from the hub (only for models you trust)."""
    overwrite: bool = False
    """Delete an existing output and start afresh instead of resuming."""

    def __post_init__(self) -> None:
        self.check_judge()
        require(self.rows_per_write >= 1, "rows_per_write", "must be >= 1", "use e.g. 64")
        require(self.dtype in DTYPES, "dtype", f"unknown dtype {self.dtype!r}", f"use one of {', '.join(DTYPES)}")


def run(cfg: ScoreConfig) -> Path:
    """Score every row of ``cfg.input`` into ``cfg.output`` (resuming a partial output)."""
    for name in ("input", "output"):
        require(bool(getattr(cfg, name)), name, "not set", f"set {name}=… to a .jsonl path")
    require(Path(cfg.output).suffix == ".jsonl", "output", "must be a .jsonl file", "name it e.g. scored.jsonl")
    check_judge_given(cfg)
    if cfg.reward_model:
        check_model_dir(cfg.reward_model, "reward_model")
    rows = load_rows(cfg.input, "preference", split=cfg.split)
    out = Path(cfg.output)
    meta = {"stage": "score", "input": fingerprint([[r["prompt"], r["completions"]] for r in rows]),
            "n_rows": len(rows), **cfg.judge_spec()}
    resumed = check_meta(out, meta, overwrite=cfg.overwrite)
    done = read_done_count(out, repair=True) if resumed else 0
    if done >= len(rows):
        print(f"{out}: all {len(rows)} rows already scored", file=sys.stderr)
        return out
    judge = make_judge(cfg, dtype=cfg.dtype, device=cfg.device, trust_remote_code=cfg.trust_remote_code)
    name = f"oracle {cfg.oracle}" if cfg.oracle else f"reward model {cfg.reward_model}"
    with tqdm(total=len(rows), initial=done, desc="score", unit="row") as bar:
        for start in range(done, len(rows), cfg.rows_per_write):
            chunk = rows[start : start + cfg.rows_per_write]
            prompts = [r["prompt"] for r in chunk for _ in r["completions"]]
            completions = [c for r in chunk for c in r["completions"]]
            rewards = judge_texts(judge, prompts, completions, cfg.judge_batch_size, name)
            scored, at = [], 0
            for r in chunk:
                k = len(r["completions"])
                scored.append({**r, "rewards": rewards[at : at + k]})
                at += k
            if not resumed and start == done:
                write_meta(out, meta)  # only now: a judge failing on the first rows leaves no files behind
            append_rows(out, scored)
            bar.update(len(chunk))
    return out


def main(argv: list[str] | None = None) -> int:
    cfg = stage_args("exoalign score", ScoreConfig, argv, description=__doc__.split("\n\n")[0])
    path = run(cfg)
    print(f"wrote {path}")
    return 0
