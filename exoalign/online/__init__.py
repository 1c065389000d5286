"""Online training: rounds of sample (``exoalign.sampling``) → score (``exoalign.rewards``) → correct
(``exoalign.losses.online_targets``) → train (the one loop of ``exoalign.train``). See ``rounds.py`` and
``docs/online.md``.

Above ``train`` in the house: ``exoalign.train.train(cfg)`` reaches :func:`train_online` by name
(``train.loop.ROUNDS_ENTRY``) when ``online.rounds >= 1``.
"""

from __future__ import annotations

from .rounds import OnlineCollator, Rounds, round_features, round_prompts, train_online

__all__ = ["OnlineCollator", "Rounds", "round_features", "round_prompts", "train_online"]
