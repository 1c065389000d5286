"""Rewards: judges that map (prompts, completions) to one finite reward each, for ``exoalign score``, ``eval``,
the demo and the online rounds.

A *judge* is ``fn(prompts, completions) -> list[float]``. Two kinds:
* **Reward model** (``reward_model=DIR|hub``): an ``AutoModelForSequenceClassification`` read from safetensors.
  One output → that scalar is the reward. Two outputs (a sentiment classifier, the paper's IMDB oracle) →
  the log-odds ``r = logit[pos] − logit[neg] = log p(pos) − log p(neg)``, where ``pos`` is the label named
  ``positive_label``, else the label whose name starts with "pos", else index 1. The model reads its input in
  one of two layouts (``judge_format``):

  - ``exoalign``: exactly what ``exoalign rm train`` trains on — prompt ids (the tokeniser's special tokens,
    left-truncated to ``judge_max_prompt_length``) + completion ids + EOS, laid out by ``GroupCollator`` and
    read by :func:`scores`;
  - ``text``: the single string ``prompt + completion`` (right-padded, cut from the left to
    ``judge_max_length`` tokens), as off-the-shelf classifiers such as a BERT sentiment model expect.

  ``auto`` picks ``exoalign`` for one-output models whose tokeniser has an EOS token and whose forward takes
  ``position_ids`` (decoder reward models, as ``rm train`` makes them), ``text`` otherwise.
* **Oracle** (``oracle=module:function`` or ``oracle=path/to/file.py:function``): any Python callable
  ``fn(prompts, completions) -> list[float]``. It is imported only from the spec the user wrote (the current
  directory is searched for the module too). A bad spec, or an oracle that returns the wrong number of values
  or non-finite ones, is an input error (exit 2).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .config import require
from .errors import ConfigError, InputError
from .logprobs import position_ids_from_mask
from .models import DTYPES, check_model_dir
from .sampling import pick_device
from .userspec import import_callable


def scores(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar rewards ``[N]`` of a one-output reward model for rows ``[N, T]`` (left-padded prompt,
    right-padded completion: the layout ``exoalign rm train`` trains on)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    return out.logits[:, 0].float()  # (N, 1) → (N,)


Judge = Callable[[list[str], list[str]], list[float]]
ORACLE_FIX = "write module:function or path/to/file.py:function, e.g. exoalign.eval.oracles:vader_sentiment"


# -------------------------------------------------------------------------------------------- oracle
def load_oracle(spec: str) -> Judge:
    """Import the callable named by ``spec`` (``module:function`` or ``file.py:function``); InputError if not."""
    return import_callable(spec, what="oracle", field="oracle", fix=ORACLE_FIX,
                           callable_fix="name a function fn(prompts, completions)")


# -------------------------------------------------------------------------------------- reward model
class RewardModelJudge:
    """Scores (prompt, completion) with a sequence classifier: 1 output → scalar, 2 outputs → log-odds."""

    def __init__(
        self, name_or_path: str, *, batch_size: int = 16, max_length: int = 1024, max_prompt_length: int = 768,
        dtype: str = "float32", device: str = "auto", trust_remote_code: bool = False,
        positive_label: str | None = None, layout: str = "auto", revision: str | None = None,
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        check_model_dir(name_or_path, "reward_model")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code,
                                                           revision=revision)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                name_or_path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, use_safetensors=True,
                revision=revision,
            )
        except (OSError, ValueError) as e:
            raise InputError(f"cannot load a reward model from {name_or_path!r} ({str(e).splitlines()[0]})",
                             field="reward_model", fix="give a sequence-classification model directory or hub name") from None
        tok = self.tokenizer
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "right"
        tok.truncation_side = "left"  # text layout: keep the completion, drop the start of a long prompt
        if self.model.config.pad_token_id is None:
            # Decoder classifiers pool at the last non-pad token and need to know the pad id.
            self.model.config.pad_token_id = tok.pad_token_id
        self.model.to(pick_device(device)).eval()
        self.batch_size, self.max_length, self.max_prompt_length = batch_size, max_length, max_prompt_length
        self.pos, self.neg = self._label_indices(positive_label)
        if layout == "auto":
            takes_positions = "position_ids" in inspect.signature(self.model.forward).parameters
            decoder_rm = self.neg is None and tok.eos_token_id is not None and takes_positions
            layout = "exoalign" if decoder_rm else "text"
        self.layout = layout

    def _label_indices(self, positive_label: str | None) -> tuple[int, int | None]:
        n = int(self.model.config.num_labels)
        if n == 1:
            return 0, None
        if n != 2:
            raise InputError(f"the reward model has {n} outputs", field="reward_model",
                             fix="use a model with 1 output (reward) or 2 (classifier: log-odds)")
        names = {i: str(self.model.config.id2label.get(i, i)).lower() for i in range(2)}
        if positive_label is not None:
            want = str(positive_label).lower()
            found = [i for i, name in names.items() if name == want or str(i) == want]
            if not found:
                raise InputError(f"no label {positive_label!r} (labels: {', '.join(names.values())})",
                                 field="positive_label", fix="name one of the classifier's labels")
            pos = found[0]
        else:
            pos = next((i for i, name in names.items() if name.startswith("pos")), 1)
        return pos, 1 - pos

    def _reward(self, logits: torch.Tensor) -> list[float]:
        logits = logits.float()  # (b, num_labels)
        r = logits[:, self.pos] if self.neg is None else logits[:, self.pos] - logits[:, self.neg]
        return r.tolist()

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        device = next(self.model.parameters()).device
        out: list[float] = []
        if self.layout == "exoalign":
            from .data import GroupCollator, tokenize_rows

            rows = [{"prompt": p, "completions": [c]} for p, c in zip(prompts, completions)]
            data = tokenize_rows(rows, self.tokenizer, max_length=self.max_length,
                                 max_prompt_length=self.max_prompt_length)
            collate = GroupCollator(self.tokenizer.pad_token_id)
            for start in range(0, len(data), self.batch_size):
                batch = collate([data[i] for i in range(start, min(start + self.batch_size, len(data)))])
                r = scores(self.model, batch["input_ids"].to(device), batch["attention_mask"].to(device))  # (b,)
                out.extend(r.tolist())
            return out
        texts = [p + c for p, c in zip(prompts, completions)]
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[start : start + self.batch_size], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(device)
            out.extend(self._reward(self.model(**enc).logits))
        return out


# ---------------------------------------------------------------------------------------- judging
@dataclass
class JudgeSettings:
    """Where rewards come from: exactly one of reward_model / oracle (shared by score and eval)."""

    reward_model: str | None = None
    """Reward model directory or hub name (sequence classifier; 1 output = reward, 2 outputs = log-odds)."""
    oracle: str | None = None
    """Reward function as module:function or file.py:function, called fn(prompts, completions) -> rewards."""
    positive_label: str | None = None
    """Two-label reward models: the label (name or index) whose log-odds is the reward; default 'pos…' or 1."""
    judge_revision: str | None = None
    """Hub revision of the reward model (branch, tag, commit or e.g. refs/pr/5 where safetensors were added)."""
    judge_batch_size: int = 32
    """Texts per reward-model forward pass or per oracle call."""
    judge_max_length: int = 1024
    """Reward model: most tokens of prompt + completion it reads (the prompt's beginning is cut first)."""
    judge_max_prompt_length: int | None = None
    """Reward model, exoalign layout: most prompt tokens (cut from the left), as data.max_prompt_length in rm
    train; null = 3/4 of judge_max_length."""
    judge_format: Literal["auto", "exoalign", "text"] = "auto"
    """Reward model input layout: exoalign (as rm train: prompt ids + completion ids + EOS), text (one string
    prompt + completion, for off-the-shelf classifiers), auto (exoalign for 1-output decoder models)."""

    def check_judge(self) -> None:
        require(self.judge_batch_size >= 1, "judge_batch_size", "must be >= 1", "use e.g. 32")
        require(self.judge_max_length >= 2, "judge_max_length", "must be >= 2", "use e.g. 1024")
        require(self.judge_max_prompt_length is None or 0 < self.judge_max_prompt_length < self.judge_max_length,
                "judge_max_prompt_length", "must be in [1, judge_max_length)",
                "leave room for the completion, e.g. 768 with 1024")

    def judge_spec(self) -> dict[str, Any]:
        return {"reward_model": self.reward_model, "oracle": self.oracle, "positive_label": self.positive_label,
                "judge_format": self.judge_format if self.reward_model else None, "judge_revision": self.judge_revision}


def check_judge_given(cfg: JudgeSettings) -> None:
    if bool(cfg.reward_model) == bool(cfg.oracle):
        raise ConfigError(
            "give exactly one of reward_model and oracle" + (" (both are set)" if cfg.reward_model else ""),
            field="oracle" if cfg.oracle else "reward_model",
            fix="set reward_model=DIR for a reward model, or oracle=module:function",
        )


def make_judge(cfg: JudgeSettings, *, dtype: str = "float32", device: str = "auto", trust_remote_code: bool = False) -> Judge:
    """The judge ``cfg`` names (reward model or oracle)."""
    check_judge_given(cfg)
    if cfg.oracle:
        return load_oracle(cfg.oracle)
    assert cfg.reward_model is not None
    return RewardModelJudge(cfg.reward_model, batch_size=cfg.judge_batch_size, max_length=cfg.judge_max_length,
                            max_prompt_length=cfg.judge_max_prompt_length or max(1, cfg.judge_max_length * 3 // 4),
                            dtype=dtype, device=device,
                            trust_remote_code=trust_remote_code, positive_label=cfg.positive_label,
                            layout=cfg.judge_format, revision=cfg.judge_revision)


def judge_texts(judge: Judge, prompts: Sequence[str], completions: Sequence[str], batch_size: int,
                name: str = "judge") -> list[float]:
    """Rewards for parallel lists of prompts and completions, called in batches; checks what comes back."""
    out: list[float] = []
    for start in range(0, len(completions), batch_size):
        p, c = list(prompts[start : start + batch_size]), list(completions[start : start + batch_size])
        values = judge(p, c)
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError):
            raise InputError(f"{name} returned something that is not a list of numbers", field="oracle",
                             fix="return one float per completion") from None
        if len(values) != len(c):
            raise InputError(f"{name} returned {len(values)} rewards for {len(c)} completions", field="oracle",
                             fix="return one float per completion")
        bad = next((v for v in values if not math.isfinite(v)), None)
        if bad is not None:
            raise InputError(f"{name} returned a non-finite reward ({bad})", field="oracle",
                             fix="return finite numbers")
        out.extend(values)
    return out
