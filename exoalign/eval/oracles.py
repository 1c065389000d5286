"""Ready-made oracles for ``exoalign score oracle=…`` and ``exoalign eval oracle=…``.

An oracle is any function ``fn(prompts: list[str], completions: list[str]) -> list[float]`` that returns one
finite reward per (prompt, completion); it is named on the command line as ``module:function`` (or
``path/to/file.py:function``) and imported only from that explicit spec.

* ``exoalign.eval.oracles:vader_sentiment`` — VADER's compound sentiment of the completion, in [−1, 1]
  (needs the ``vaderSentiment`` package: ``pip install exoalign[demo]``). Rule-based, instant on a CPU:
  the offline stand-in for the IMDB sentiment classifier.
* ``exoalign.eval.oracles:vader_logodds`` — the same score mapped to log-odds,
  ``log((1 + c) / (1 − c))`` with ``c`` clipped to ±0.999, i.e. ``logit(p_pos)`` for ``p_pos = (1 + c)/2``:
  the scale of the paper's classifier reward ``log p(pos) − log p(neg)``.

The paper's IMDB oracle itself (a sentiment classifier's log-odds) is a reward model with two labels: pass it
as ``reward_model=<classifier>`` — ``score`` and ``eval`` turn a two-label classifier into
``logit[positive] − logit[negative]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from ..errors import InputError


@lru_cache(maxsize=1)
def _vader() -> Any:
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise InputError(
            "the VADER oracle needs the vaderSentiment package", field="oracle",
            fix="pip install vaderSentiment (or exoalign[demo])",
        ) from None
    return SentimentIntensityAnalyzer()


def vader_sentiment(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """VADER compound sentiment of each completion (the prompt is ignored: it is the same for a whole group)."""
    analyzer = _vader()
    return [float(analyzer.polarity_scores(c)["compound"]) for c in completions]


def vader_logodds(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """VADER compound ``c`` as log-odds ``log((1 + c)/(1 − c))``, clipped to |c| ≤ 0.999 (so |r| ≤ 7.6)."""
    out = []
    for c in vader_sentiment(prompts, completions):
        c = min(max(c, -0.999), 0.999)
        out.append(math.log((1 + c) / (1 - c)))
    return out
