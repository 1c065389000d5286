"""The trainer: config dataclasses, the Trainer (in-memory models and rows, callbacks), the accelerate loop, the
reference cache and checkpoints.

``Trainer(model, train_data, tokenizer=, config=, ref_model=, eval_data=, callbacks=).train()`` aligns a model from
Python; ``train(cfg)`` runs ``exoalign train`` (through the Trainer); ``compute_loss(model, batch, loss_cfg)`` is one
batch's loss and metrics; ``fit(accelerator, args, job)`` is the loop that ``exoalign sft`` and ``exoalign rm train``
share. See ``docs/training.md``. Attributes are imported on first use, so reading a config does not load accelerate.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_WHERE = {
    "TrainConfig": "config",
    "ModelConfig": "config",
    "DataConfig": "config",
    "LossConfig": "config",
    "TrainArgs": "config",
    "OnlineConfig": "config",
    "Trainer": "trainer",
    "TrainerState": "engine",
    "train": "loop",
    "compute_loss": "step",
    "fit": "engine",
    "Job": "engine",
    "TrainingError": "engine",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'exoalign.train' has no attribute {name!r}")
    return getattr(import_module(f".{_WHERE[name]}", __name__), name)
