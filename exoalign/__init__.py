"""exoalign: align causal language models by EXO (efficient exact optimization), with the DPO family beside it.

EXO (Ji et al., ICML 2024, https://arxiv.org/abs/2402.00856) minimises the reverse KL between the policy's
and the reward's distributions over K completions of a prompt; DPO minimises the forward KL. See
``exoalign.losses`` for the math.

From Python::

    import exoalign
    model = exoalign.Trainer(model, rows, tokenizer=tok, config={"loss": {"name": "exo"}}).train()

Top-level names (imported on first use, so ``import exoalign`` does not import torch): ``Trainer``,
``TrainConfig``, ``load_rows``, ``get_loss``, ``register_loss``.
"""

from __future__ import annotations

import os
import sys
import warnings
from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_WHERE = {
    "Trainer": "exoalign.train.trainer",
    "TrainerState": "exoalign.train.engine",
    "TrainConfig": "exoalign.train.config",
    "load_rows": "exoalign.data",
    "get_loss": "exoalign.losses",
    "register_loss": "exoalign.losses",
}

__all__ = ["ThreadPolicyWarning", "__version__", *sorted(_WHERE)]


class ThreadPolicyWarning(UserWarning):
    """torch was imported before exoalign, with OpenMP's default (spinning) wait policy."""


def _thread_policy() -> None:
    """Passive OpenMP waiting, as the CLI sets it, unless the user chose a policy or a thread count.

    OpenMP reads ``OMP_WAIT_POLICY`` when torch loads: set before, it makes training from Python as fast as the CLI
    on a shared or loaded machine (spinning threads made steps up to 3x slower, docs/speed.md). Once torch is
    imported it is too late: one warning says how to get it.
    """
    if "OMP_WAIT_POLICY" in os.environ or "OMP_NUM_THREADS" in os.environ:
        return
    if "torch" not in sys.modules:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        return
    warnings.warn(
        "torch was imported before exoalign, so OpenMP threads spin while they wait (training on a shared CPU can "
        "run up to 3x slower). Fix: import exoalign before torch, or set OMP_WAIT_POLICY=PASSIVE in the "
        "environment before Python starts", ThreadPolicyWarning, stacklevel=3)


_thread_policy()


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'exoalign' has no attribute {name!r}")
    return getattr(import_module(_WHERE[name]), name)
