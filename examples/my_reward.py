"""An example reward function: how warmly a one-sentence film review speaks of the film.

Use it as the judge of ``exoalign score`` and ``exoalign eval``:

    exoalign score input=data/groups.jsonl output=data/scored.jsonl --oracle examples/my_reward.py:score

Any function ``fn(prompts: list[str], completions: list[str]) -> list[float]`` works the same way: one finite
reward per (prompt, completion), larger is better. This one counts words of two small lexicons,

    r = (n_positive − n_negative) / sqrt(n_words),      clipped to [−2, 2],

so a short warm sentence scores about 0.5–1, a neutral one 0 and a harsh one about −0.5 to −1. Dividing by
``sqrt(n_words)`` keeps a rambling answer that repeats "great" from scoring without bound. Rule-based, instant,
and with no dependencies; replace it with your own scorer (or a reward model: ``reward_model=DIR``).
"""

from __future__ import annotations

import math
import re

POSITIVE = frozenset("""
    amazing beautiful beautifully best brilliant captivating charming clever compelling delight delightful
    enjoyable engaging excellent exciting fantastic fine fresh fun funny gentle good gorgeous great gripping
    heartfelt honest hopeful impressive inventive joy lovely magnificent masterpiece moving perfect pleasant
    powerful remarkable rewarding rich satisfying sharp smart solid sparkling splendid strong stunning
    superb superbly surprising tender thoughtful touching unforgettable warm wise witty wonderful
""".split())
NEGATIVE = frozenset("""
    awful awkward bad badly boring clumsy confusing disappointing dull empty flat forgettable frustrating grim
    joyless lazy loud mediocre mess messy muddled pointless poor poorly predictable rushed shallow slow
    tedious terrible thin tired ugly unbearable uneven waste weak worst
""".split())
_WORD = re.compile(r"[a-z']+")


def review_score(text: str) -> float:
    """``(n_positive − n_negative) / sqrt(n_words)`` of one text, clipped to [−2, 2]; 0 for no words."""
    words = _WORD.findall(text.lower())
    if not words:
        return 0.0
    raw = (sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words)) / math.sqrt(len(words))
    return max(-2.0, min(2.0, raw))


def score(prompts: list[str], completions: list[str]) -> list[float]:
    """One reward per completion (the prompt is not used: every prompt asks for the same kind of review)."""
    return [review_score(c) for c in completions]
