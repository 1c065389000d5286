"""``train(cfg)``: ``exoalign train`` from a config: the :class:`~exoalign.train.trainer.Trainer` on the model and
rows the config names (``model.name_or_path``, ``data.train_file``); returns ``output_dir/final``.

The row and model preparation it shares with ``sft`` and ``rm train`` is in ``prepare.py`` (re-exported here).
"""

from __future__ import annotations

from pathlib import Path

from .config import TrainConfig
from .prepare import load_preference_data, load_reference, prepare_rows, split_heldout, texts_of
from .trainer import ROUNDS_ENTRY, Trainer

__all__ = ["ROUNDS_ENTRY", "load_preference_data", "load_reference", "prepare_rows", "split_heldout", "texts_of",
           "train"]


def train(cfg: TrainConfig) -> Path:
    """Run ``exoalign train``; returns ``output_dir/final`` (loadable with ``AutoModelForCausalLM.from_pretrained``).

    With ``online.rounds >= 1`` the Trainer runs the online rounds (:mod:`exoalign.online`).
    """
    final, _ = Trainer(config=cfg).run()
    return final
