"""Synthetic movie reviews for the demo: a seeded stochastic grammar, prompts, and the VADER oracle reward.

The demo reproduces the paper's IMDB experiment (controlled sentiment generation) offline and on a CPU.
IMDB is replaced by short reviews drawn from a stochastic grammar: invented film titles, directors and
actors, genres, plots, aspects of a film (acting, score, pacing, ...), positive and negative adjectives,
intensifiers, negation ("not bad", "never boring") and contrast ("the score was lovely, but the plot was
dull"). Reviews are ``positive``, ``negative`` or ``mixed``; a mixed review puts praise and criticism in one
sentence joined by *but*/*although*, in either order, so its overall tone depends on word order (VADER,
like a reader, weighs the clause after *but* more).

A prompt is the first few words of a review, as in the paper (the first tokens of an IMDB review). The
openings are neutral by construction (titles and names carry no sentiment in VADER's lexicon), so the
sentiment of a review is decided by its completion: that is what the policy learns to control.

The oracle reward is the library's ``exoalign.eval.oracles:vader_sentiment``: VADER's compound score of
the completion, in [-1, 1], called the way a reward model is (``fn(prompts, completions)``). Scoring the
completion alone loses nothing here because the prompts score exactly 0 (tested). The score is bounded, so
it saturates: once a completion is plainly positive more praise earns little, and a policy can only buy
reward with KL up to that ceiling — the shape of the paper's IMDB frontier. Some negative words of the
grammar (*tedious*, *wooden*, *predictable*) are not in VADER's lexicon, so the oracle is an imperfect judge
of the grammar's own labels, like a learned reward model.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

LABELS = ("positive", "negative", "mixed")

# ------------------------------------------------------------------------------------ the lexicon
# Names and titles are built from words that VADER's lexicon does not score, so openings are neutral.
TITLE_FIRST = [
    "Silent", "Last", "Golden", "Hidden", "Crimson", "Frozen", "Endless", "Distant", "Midnight", "Paper",
    "Iron", "Glass", "Velvet", "Northern", "Second", "Seventh", "Winter", "Copper", "Electric", "Secret",
]
TITLE_SECOND = [
    "Harbor", "Garden", "Kingdom", "River", "Summer", "Letter", "Machine", "Horizon", "Station", "Mirror",
    "Lighthouse", "Orchard", "Frontier", "Circus", "Voyage", "Island", "Tower", "Signal", "Canyon", "Bridge",
]
FIRST_NAMES = [
    "Anna", "Marco", "Helen", "Victor", "Clara", "Jonas", "Maya", "Oliver", "Rosa", "Daniel", "Ingrid",
    "Samuel", "Leila", "Tomas", "Nora", "Felix", "Greta", "Hugo", "Iris", "Pablo",
]
LAST_NAMES = [
    "Moreau", "Lindqvist", "Okafor", "Brennan", "Castillo", "Novak", "Hartley", "Sato", "Fischer", "Delgado",
    "Whitfield", "Kowalski", "Ferreira", "Haddad", "Lund", "Abbott",
]
GENRES = [
    "satire", "drama", "courtroom drama", "western", "musical", "documentary", "biopic", "noir",
    "science fiction film", "animated feature", "detective story", "costume drama", "mystery", "period piece",
    "family film", "heist movie", "road movie", "spy film",
]
CHARACTERS = [
    "detective", "teacher", "young widow", "retired boxer", "farmer", "pilot", "nurse", "journalist",
    "chef", "soldier", "painter", "lawyer", "sailor", "scientist", "baker", "mechanic", "student", "priest",
]
PLOTS = [
    "moves to a small town", "searches for a missing brother", "plans one last heist", "returns home by sea",
    "discovers a family secret", "has to rebuild the city", "runs a restaurant in Paris", "travels across the desert",
    "meets a stranger on a train", "tries to find an old neighbor", "inherits an old hotel",
    "investigates a string of robberies", "builds a boat in the backyard", "coaches a school football team",
]
RELATIONS = ["wife", "husband", "brother", "sister", "colleagues", "parents", "kids", "roommate", "cousin", "dad", "mom"]
WHEN = ["night", "weekend", "week", "month", "Friday", "Sunday", "summer", "winter"]
VENUES = ["cinema", "film society", "drive in", "local theater", "film club", "multiplex"]
ASPECTS = [
    "acting", "plot", "script", "dialogue", "soundtrack", "score", "cinematography", "pacing", "ending",
    "characters", "visual effects", "editing", "costumes", "direction", "banter", "story", "subplot",
    "camera work", "lead performance", "side characters", "opening scene", "final act", "set design",
    "music", "action scenes", "twist", "first half", "second half", "lighting", "casting",
]
ROLES = ["captain", "mother", "detective", "old king", "young sailor", "neighbor", "mayor", "father"]

POSITIVE_ADJ = [
    "great", "wonderful", "brilliant", "excellent", "superb", "delightful", "charming", "beautiful", "stunning",
    "moving", "hilarious", "clever", "gripping", "fantastic", "amazing", "lovely", "impressive", "fresh",
    "powerful", "touching", "enjoyable", "fun", "perfect", "outstanding", "masterful", "elegant", "gorgeous",
    "memorable", "thrilling", "witty", "smart", "warm", "magnificent", "inspired", "remarkable", "heartfelt",
    "lively", "sweet",
]
NEGATIVE_ADJ = [
    "terrible", "awful", "boring", "dull", "weak", "bad", "horrible", "clumsy", "lifeless", "stupid", "ugly",
    "painful", "disappointing", "tedious", "messy", "annoying", "pointless", "bland", "poor", "dreadful", "flat",
    "predictable", "forgettable", "lazy", "confusing", "wooden", "miserable", "ridiculous", "lame", "pathetic",
    "irritating", "unpleasant", "hopeless", "crude", "dumb", "tired", "forced", "stale",
]
INTENSIFIERS = ["very", "really", "incredibly", "extremely", "so", "absolutely", "quite", "rather",
                "a bit", "somewhat", "deeply", "utterly", "fairly", "thoroughly"]
POSITIVE_NOUNS = ["gem", "masterpiece", "treat", "delight", "joy", "triumph", "pleasure", "classic", "winner"]
NEGATIVE_NOUNS = ["mess", "disaster", "failure", "waste of time", "letdown", "bore", "snooze", "chore", "dud"]
POSITIVE_VERBS = ["loved", "enjoyed", "adored", "liked", "admired", "appreciated"]
NEGATIVE_VERBS = ["hated", "disliked", "could not stand", "regretted watching", "was annoyed by", "was bored by",
                  "was let down by"]
POSITIVE_FEEL = ["laugh", "smile", "think", "believe in movies again", "want to watch it twice"]
NEGATIVE_FEEL = ["yawn", "check my phone", "want my money back", "angry", "fall asleep", "sad", "sick"]
AUDIENCES = ["everyone", "families", "fans of the genre", "anyone", "my colleagues", "film buffs"]
CONTRASTS = ["but", "but", "but", "yet", "though"]  # "but" most often: the structure VADER knows best


@dataclass(frozen=True)
class Review:
    """One generated review and the grammar's label for it."""

    text: str
    label: str
    """``positive``, ``negative`` or ``mixed`` (the grammar's intent; the oracle judges the text itself)."""


# ------------------------------------------------------------------------------------ the grammar
def _pick(rng: random.Random, items: Sequence[str]) -> str:
    return items[rng.randrange(len(items))]


def _title(rng: random.Random) -> str:
    return f"The {_pick(rng, TITLE_FIRST)} {_pick(rng, TITLE_SECOND)}"


def _person(rng: random.Random) -> str:
    return f"{_pick(rng, FIRST_NAMES)} {_pick(rng, LAST_NAMES)}"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _opening(rng: random.Random) -> str:
    """A neutral first sentence: where the prompt comes from."""
    t, g = _title(rng), _pick(rng, GENRES)
    forms = [
        lambda: f"I watched {t} last {_pick(rng, WHEN)} with my {_pick(rng, RELATIONS)}.",
        lambda: f"{t} is {_article(g)} {g} directed by {_person(rng)}.",
        lambda: f"My {_pick(rng, RELATIONS)} and I saw {t} at the {_pick(rng, VENUES)}.",
        lambda: f"This {g} from {_person(rng)} stars {_person(rng)} and {_person(rng)}.",
        lambda: f"In {t}, {_person(rng)} plays a {_pick(rng, CHARACTERS)} who {_pick(rng, PLOTS)}.",
        lambda: f"So I finally saw {t}, the new {g} with {_person(rng)}.",
        lambda: f"{t} tells the story of a {_pick(rng, CHARACTERS)} who {_pick(rng, PLOTS)}.",
        lambda: f"Just got back from {t} at the {_pick(rng, VENUES)}.",
        lambda: f"After reading the book, I rented {t} on a {_pick(rng, WHEN)} evening.",
        lambda: f"I went to see {t} because {_person(rng)} is in it.",
    ]
    return _pick(rng, forms)()  # type: ignore[arg-type]


def _adj(rng: random.Random, sign: int, intensify: float = 0.4) -> str:
    """An adjective of polarity ``sign``, sometimes with an intensifier ("truly awful")."""
    word = _pick(rng, POSITIVE_ADJ if sign > 0 else NEGATIVE_ADJ)
    return f"{_pick(rng, INTENSIFIERS)} {word}" if rng.random() < intensify else word


def _clause(rng: random.Random, sign: int) -> str:
    """A judgement of one aspect with polarity ``sign`` (no final punctuation, lower-case start)."""
    a, past = _pick(rng, ASPECTS), rng.random() < 0.6
    verb = ("were" if past else "are") if a.endswith("s") else ("was" if past else "is")
    r = rng.random()
    if r < 0.12:  # negation of the opposite: "the plot was not boring", "the score is never dull"
        neg = rng.choice(["not", "never", "not at all"] if sign > 0 else ["not", "hardly", "not exactly"])
        return f"the {a} {verb} {neg} {_pick(rng, NEGATIVE_ADJ if sign > 0 else POSITIVE_ADJ)}"
    if r < 0.6:
        return f"the {a} {verb} {_adj(rng, sign)}"
    if r < 0.8:
        return f"{_person(rng)} {'was' if past else 'is'} {_adj(rng, sign)} as the {_pick(rng, ROLES)}"
    return f"I {_pick(rng, POSITIVE_VERBS if sign > 0 else NEGATIVE_VERBS)} the {a}"


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _judgement(rng: random.Random, sign: int) -> str:
    """A whole sentence with polarity ``sign``."""
    r = rng.random()
    if r < 0.55:
        return _cap(_clause(rng, sign)) + rng.choice([".", ".", ".", "!"])
    if r < 0.7:
        a, b = _clause(rng, sign), _clause(rng, sign)
        return _cap(f"{a} and {b}.")
    if r < 0.82:
        noun = _pick(rng, POSITIVE_NOUNS if sign > 0 else NEGATIVE_NOUNS)
        lead = rng.choice(["It is", "This film is", "What", "Honestly, it is", "The whole thing is"])
        adj = rng.choice(["", "real ", "total ", "little ", "complete "])
        return f"{lead} {_article(adj or noun)} {adj}{noun}{'!' if lead == 'What' else '.'}"
    if r < 0.92:
        return f"The {_pick(rng, ASPECTS)} made me {_pick(rng, POSITIVE_FEEL if sign > 0 else NEGATIVE_FEEL)}."
    other = _title(rng)
    return f"It is {rng.choice(['much ', 'far ', ''])}{'better' if sign > 0 else 'worse'} than {other}."


def _contrast(rng: random.Random, first: int) -> str:
    """Praise and criticism in one sentence; the clause after the connective has polarity ``-first``."""
    a, b = _clause(rng, first), _clause(rng, -first)
    if rng.random() < 0.3:
        return _cap(f"although {a}, {b}.")
    return _cap(f"{a}, {_pick(rng, CONTRASTS)} {b}.")


def _closing(rng: random.Random, sign: int) -> str:
    if sign > 0:
        forms = [
            lambda: f"I would {rng.choice(['', 'highly ', 'really '])}recommend it to {_pick(rng, AUDIENCES)}.",
            lambda: f"{rng.choice(['Eight', 'Nine', 'Ten'])} out of ten.",
            lambda: "Go see it!",
            lambda: f"Worth watching for the {_pick(rng, ASPECTS)} alone.",
        ]
    elif sign < 0:
        forms = [
            lambda: "Do not waste your money.",
            lambda: f"{rng.choice(['One', 'Two', 'Three'])} out of ten.",
            lambda: "Skip this one.",
            lambda: f"I would not recommend it to {_pick(rng, AUDIENCES)}.",
        ]
    else:
        forms = [
            lambda: f"{rng.choice(['Five', 'Six'])} out of ten.",
            lambda: "Worth a look if you have nothing else to do.",
            lambda: "Wait until it is on television.",
        ]
    return _pick(rng, forms)()  # type: ignore[arg-type]


def review(rng: random.Random, label: str | None = None) -> Review:
    """Draw one review (its ``label`` drawn 40/40/20 positive/negative/mixed unless given)."""
    label = label or rng.choices(LABELS, weights=(0.4, 0.4, 0.2))[0]
    sentences = [_opening(rng)]
    if label == "mixed":
        first = rng.choice([1, -1])
        sentences.append(_contrast(rng, first))
        if rng.random() < 0.5:
            sentences.append(_judgement(rng, rng.choice([1, -1])))
        closing = rng.choice([0, 0, 1, -1])
    else:
        sign = 1 if label == "positive" else -1
        for _ in range(rng.choice([1, 2, 2, 3])):
            # a minority of sentences in a one-sided review concede a point, as people do
            sentences.append(_contrast(rng, -sign) if rng.random() < 0.15 else _judgement(rng, sign))
        closing = sign if rng.random() < 0.6 else None
    if closing is not None:
        sentences.append(_closing(rng, closing))
    return Review(" ".join(sentences), label)


def generate_reviews(n: int, seed: int = 0) -> list[Review]:
    """``n`` reviews, the same for the same ``seed`` on every machine (``random.Random`` is portable)."""
    rng = random.Random(seed)
    return [review(rng) for _ in range(n)]


def split_prompt(text: str, n_words: int) -> tuple[str, str]:
    """Split a review after its first ``n_words`` words: ``(prompt, completion)``, the completion keeping
    its leading space so ``prompt + completion == text`` and tokenisation matches the whole text."""
    m = re.match(r"\s*(?:\S+\s+){" + str(max(n_words - 1, 0)) + r"}\S+", text)
    if m is None or m.end() == len(text):
        return text, ""
    return text[: m.end()], text[m.end():]


def prompt_rows(reviews: Sequence[Review], seed: int = 0, min_words: int = 3, max_words: int = 6) -> list[dict]:
    """SFT rows ``{"prompt", "completion", "label"}``: each review split after 3-6 words (seeded)."""
    rng = random.Random(seed)
    rows = []
    for r in reviews:
        prompt, completion = split_prompt(r.text, rng.randint(min_words, max_words))
        rows.append({"prompt": prompt, "completion": completion, "label": r.label})
    return rows


def vocabulary(texts: Sequence[str]) -> set[str]:
    """The distinct lower-cased words (letters and apostrophes) of ``texts``."""
    return {w for t in texts for w in re.findall(r"[a-z']+", t.lower())}


# ------------------------------------------------------------------------------------ the oracle
ORACLE = "exoalign.eval.oracles:vader_sentiment"
"""The demo's reward, as ``exoalign score``/``exoalign eval`` take it: VADER compound of the completion."""


def sentiment(texts: Sequence[str]) -> list[float]:
    """VADER compound score of each text, in [-1, 1] (> 0.05 reads positive, < -0.05 negative)."""
    from ..eval.oracles import vader_sentiment

    return vader_sentiment([""] * len(texts), list(texts))
