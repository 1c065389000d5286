"""``exoalign sample``: K completions per prompt from a model → group rows ``{"prompt", "completions", …}``.

    exoalign sample model=runs/sft/final prompts=data/prompts.jsonl output=data/groups.jsonl k=4 temperature=0.8

The prompts come from any file with a ``prompt`` (or ``messages``) field: prompt, sft, pair or group rows.
Completion ``j`` of prompt ``i`` is drawn from its own random stream seeded by ``(seed, i, j)`` (see
``exoalign/sampling.py``), so the output does not depend on the batch size and a resumed run writes exactly the rows
an uninterrupted one would have written.

Resuming: the settings are recorded in ``<output>.meta.json``. Rerunning the same command after a kill counts
the complete rows already in the output, cuts off a torn last line, and continues with the next prompt.
Rerunning with other settings is refused (``overwrite=true`` starts afresh).

Each row also records, per completion, whether it ``finished`` (the model emitted EOS) or was cut at
``max_new_tokens``, and the sampled ``completion_ids`` (ending in the stop token when finished)::

    {"prompt": "...", "completions": ["...", "..."], "finished": [true, false], "completion_ids": [[...], [...]]}

``exoalign train`` then appends EOS only to the finished ones and scores the sampled ids as they are, so the
policy is never trained on an end of sequence it did not produce (see ``exoalign.data.tokenize``).

Blank completions: the data format rejects completions that are empty or only whitespace, so ``sample``
forbids EOS as the first token (``min_new_tokens=1``) and redraws a blank completion from a fresh stream
(up to ``max_redraws`` times). The redraws condition the samples on being non-blank; set
``min_new_tokens=0`` to sample the model unchanged.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..config import require, stage_args
from ..data import append_rows, encode_prompts, get_preset, parse_columns, read_done_count
from ..errors import ConfigError
from ..fileio import check_meta, fingerprint, write_meta
from ..hardware import keep_freed_memory
from ..models import DTYPES, check_model_dir, load_tokenizer
from ..sampling import (
    Completion,
    Sampler,
    SamplingSettings,
    build_sampler,
    load_prompts,
    pick_device,
    resolve_backend,
)


@dataclass
class SampleConfig(SamplingSettings):
    """``exoalign sample``: K completions per prompt (Hugging Face generate, or vLLM on a GPU)."""

    model: str = ""
    """Model to sample from (usually π_sft): a local directory, a hub name or smollm2 (the offline SmolLM2-135M)."""
    tokenizer: str | None = None
    """Tokeniser directory or hub name; defaults to model."""
    prompts: str = ""
    """Prompt source: JSONL/JSON/Parquet/save_to_disk/hub with a 'prompt' (or 'messages') field per row."""
    split: str = "train"
    """Split to read from a hub dataset or a DatasetDict directory."""
    preset: str | None = None
    """The prompts' published schema, read as it is (hh-rlhf, ultrafeedback, ...: see docs/data.md)."""
    columns: dict[str, Any] | str | None = None
    """Map the source's fields onto ours, e.g. {prompt: instruction} (see docs/data.md)."""
    output: str = ""
    """Output JSONL of group rows {"prompt", "completions", "finished", "completion_ids"}; appended to when resuming."""
    k: int = 2
    """Completions per prompt (K >= 2: a group needs at least two)."""
    max_prompts: int | None = None
    """Use only the first this many (distinct) prompts; null = all."""
    dedupe: bool = True
    """Sample each distinct prompt once (pair datasets repeat prompts); order of first appearance is kept."""
    min_new_tokens: int = 1
    """Forbid EOS for this many first tokens; 1 avoids empty completions (0 samples the model unchanged)."""
    max_redraws: int = 3
    """Redraw a completion that decodes to blank text at most this many times, then stop with an error."""
    dtype: str = "float32"
    """Weights dtype: float32, bfloat16, float16 or auto."""
    device: str = "auto"
    """auto (CUDA when available), cpu, cuda or cuda:N."""
    trust_remote_code: bool = False
    """Allow model code from the hub (only for models you trust)."""
    overwrite: bool = False
    """Delete an existing output and start afresh instead of resuming."""

    def __post_init__(self) -> None:
        self.check_sampling()
        self.columns = parse_columns(self.columns, "columns")
        if self.preset:
            get_preset(self.preset, "preset")
        require(self.k >= 2, "k", f"K must be at least 2 (got {self.k})", "use k=2 or more")
        require(self.max_prompts is None or self.max_prompts >= 1, "max_prompts", "must be >= 1", "use null for all")
        require(self.max_redraws >= 0, "max_redraws", "must be >= 0", "use e.g. 3")
        require(self.dtype in DTYPES, "dtype", f"unknown dtype {self.dtype!r}", f"use one of {', '.join(DTYPES)}")


def check_runnable(cfg: SampleConfig) -> None:
    """Paths the defaults leave empty (so ``--help`` works) must be set for a run."""
    for name, what in (("model", "a model directory or hub name"), ("prompts", "a prompt file"),
                       ("output", "an output .jsonl path")):
        require(bool(getattr(cfg, name)), name, "not set", f"set {name}=… to {what}")
    require(Path(cfg.output).suffix == ".jsonl", "output", "must be a .jsonl file", "name the output e.g. groups.jsonl")
    check_model_dir(cfg.model, "model")


def redraw_blanks(
    sampler: Sampler, prompt_ids: list[list[int]], indices: list[int], groups: list[list[Completion]], tries: int
) -> None:
    """Replace blank completions in ``groups`` (in place) by draws from fresh streams ``redraw{n}:{j}``."""
    base = getattr(sampler, "stream", "")
    for g, (ids, i) in enumerate(zip(prompt_ids, indices)):
        for j in range(len(groups[g])):
            n = 0
            while not groups[g][j].text.strip():
                n += 1
                if n > tries:
                    raise RuntimeError(
                        f"completion {j} of prompt {i} decoded to blank text {tries + 1} times; the model keeps "
                        "emitting only whitespace/special tokens (raise min_new_tokens or check the model)"
                    )
                sampler.stream = f"{base}redraw{n}:{j}"  # type: ignore[attr-defined]
                try:
                    groups[g][j] = sampler.generate([ids], [i], 1)[0][0]
                finally:
                    sampler.stream = base  # type: ignore[attr-defined]


def group_row(prompt: str, group: list[Completion]) -> dict[str, Any]:
    """The output row of one prompt: texts, whether each finished (hit EOS), and the sampled ids."""
    return {"prompt": prompt, "completions": [c.text for c in group], "finished": [bool(c.finished) for c in group],
            "completion_ids": [list(c.ids) for c in group]}


def run(cfg: SampleConfig) -> Path:
    """Sample ``cfg.k`` completions for every prompt into ``cfg.output`` (resuming a partial output)."""
    check_runnable(cfg)
    out = Path(cfg.output)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, trust_remote_code=cfg.trust_remote_code, padding_side="left",
                               field="tokenizer" if cfg.tokenizer else "model")
    prompts = load_prompts(cfg.prompts, split=cfg.split, tokenizer=tokenizer, dedupe=cfg.dedupe, limit=cfg.max_prompts,
                           columns=cfg.columns, preset=cfg.preset)
    backend = resolve_backend(cfg.backend)
    meta = {
        "stage": "sample", "model": cfg.model, "prompts": fingerprint(prompts), "n_prompts": len(prompts),
        "k": cfg.k, "backend": backend, **cfg.sampling_dict(),
    }
    resumed = check_meta(out, meta, overwrite=cfg.overwrite)
    done = read_done_count(out, repair=True) if resumed else 0
    if done > len(prompts):
        raise ConfigError(f"{out} holds {done} rows but there are only {len(prompts)} prompts", field="output",
                          fix="pass overwrite=true or choose a new output")
    if done == len(prompts):
        print(f"{out}: all {done} prompts already sampled", file=sys.stderr)
        return out
    if done:
        print(f"{out}: resuming after {done} of {len(prompts)} prompts", file=sys.stderr)
    sampler = build_sampler(cfg, cfg.model, tokenizer, dtype=cfg.dtype, device=cfg.device,
                            trust_remote_code=cfg.trust_remote_code)
    keep_freed_memory(device=pick_device(cfg.device))  # decode steps reuse the heap on CPU (exoalign/hardware.py)
    prompt_ids = encode_prompts(tokenizer, prompts, cfg.max_prompt_length)
    with tqdm(total=len(prompts), initial=done, desc="sample", unit="prompt") as bar:
        for start in range(done, len(prompts), cfg.batch_size):
            indices = list(range(start, min(start + cfg.batch_size, len(prompts))))
            batch_ids = [prompt_ids[i] for i in indices]
            groups = sampler.generate(batch_ids, indices, cfg.k)
            redraw_blanks(sampler, batch_ids, indices, groups, cfg.max_redraws)
            if not resumed and start == done:
                write_meta(out, meta)  # only now, so a run that fails before its first rows leaves no files
            append_rows(out, [group_row(prompts[i], g) for i, g in zip(indices, groups)])
            bar.update(len(indices))
    return out


def main(argv: list[str] | None = None) -> int:
    cfg = stage_args("exoalign sample", SampleConfig, argv, description=__doc__.split("\n\n")[0])
    path = run(cfg)
    print(f"wrote {path}")
    return 0
