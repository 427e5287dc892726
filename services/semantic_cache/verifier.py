"""The verification step: does a near neighbour really ask the same question?

Sentence embeddings confuse questions that share their words but not their meaning: "convert USD
to EUR" and "convert EUR to USD" (cosine 0.99), a negation, a changed number or name. Candidates
that are not exact matches are checked here, on the two texts, before they are served. The check
is a logistic regression over cross-features of the two questions (the cosine, word and bigram
overlap, word order among the shared words, numbers, negation, length, how much of each side's
content words the other covers); its weights are fitted offline (``python -m
services.tools.evaluation.semantic_cache fit``) on PAWS and GPTCache's mock data only, and
shipped as JSON with their provenance (``verifier_weights.json``). A candidate is served when
no cross-check vetoes it (``VETOES``) and the model's probability that the two questions mean
the same is at least the configured ``min_probability``; ``min_probability`` 0 turns the whole
step off (vetoes included), which is the plain-embedding baseline of the harness.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

WEIGHTS_PATH = Path(__file__).with_name("verifier_weights.json")
FEATURE_VERSION = "cachemesh.verifier.features.v3"

_WORD = re.compile(r"[^\W_]+(?:[.,][0-9]+)*", re.UNICODE)
_NUMBER = re.compile(r"^[0-9]+(?:[.,][0-9]+)*$")
_NEGATIONS = frozenset(
    re.findall(
        r"\S+",
        "not no never none nobody nothing neither nor without cannot cant dont doesnt didnt isnt "
        "arent wasnt werent wont wouldnt shouldnt couldnt hasnt havent hadnt",
    )
)
_STOPWORDS = frozenset(
    re.findall(
        r"\S+",
        "a an the of to in on at for from by with and or but as is are was were be been being am "
        "do does did i you he she it we they me him her us them my your his its our their this "
        "that these those what which who whom whose how why when where there here can could will "
        "would should shall may might must have has had if then than so such about into over also "
        "some any all each more most very just s t",
    )
)
FEATURES = (
    "cosine",
    "cosine_sq",
    "word_jaccard",
    "content_jaccard",
    "bigram_jaccard",
    "trigram_jaccard",
    "order_discordance",
    "same_words_reordered",
    "number_conflict",
    "number_one_side",
    "negation_mismatch",
    "length_ratio",
    "query_coverage",
    "entry_coverage",
    "min_coverage",
    "unmatched_content",
    "same_bag",
    "same_bag_x_bigram",
    "same_bag_x_discordance",
)
# Cross-checks that refuse outright, whatever the model says: the same content words in
# another order ("USD to EUR" / "EUR to USD"), different numbers, a number on one side only,
# a negation on one side only.
VETOES = ("same_words_reordered", "number_conflict", "number_one_side", "negation_mismatch")


def words(text: str) -> list[str]:
    """Casefolded word tokens; "don't" becomes "dont" (a negation)."""
    return _WORD.findall(text.casefold().replace("n't", "nt").replace("'", ""))


def _jaccard(a: AbstractSet[object], b: AbstractSet[object]) -> float:
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def _ngrams(tokens: list[str], n: int) -> set[object]:
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def _discordance(a: list[str], b: list[str]) -> float:
    """Share of pairs of words (each once in both texts) whose order differs."""
    once = [w for w in a if a.count(w) == 1 and b.count(w) == 1]
    if len(once) < 2:
        return 0.0
    pos_b = {w: b.index(w) for w in once}
    pairs = discordant = 0
    for i in range(len(once)):
        for j in range(i + 1, len(once)):
            pairs += 1
            discordant += pos_b[once[i]] > pos_b[once[j]]
    return discordant / pairs


def features(first: str, second: str, cosine: float) -> npt.NDArray[np.float64]:
    a, b = words(first), words(second)
    ca = [w for w in a if w not in _STOPWORDS]
    cb = [w for w in b if w not in _STOPWORDS]
    na = {w for w in a if _NUMBER.match(w)}
    nb = {w for w in b if _NUMBER.match(w)}
    content_a, content_b = set(ca), set(cb)
    discord = _discordance(ca, cb)
    shared = len(content_a & content_b)
    query_cov = shared / len(content_b) if content_b else 1.0
    entry_cov = shared / len(content_a) if content_a else 1.0
    same_bag = float(content_a == content_b)
    bigrams = _jaccard(_ngrams(a, 2), _ngrams(b, 2))
    values = (
        cosine,
        cosine * cosine,
        _jaccard(set(a), set(b)),
        _jaccard(content_a, content_b),
        bigrams,
        _jaccard(_ngrams(a, 3), _ngrams(b, 3)),
        discord,
        float(bool(same_bag) and discord > 0),
        float(bool(na) and bool(nb) and na != nb),
        float(bool(na) != bool(nb)),
        float(any(w in _NEGATIONS for w in a) != any(w in _NEGATIONS for w in b)),
        min(len(a), len(b)) / max(len(a), len(b), 1),
        query_cov,
        entry_cov,
        min(query_cov, entry_cov),
        float(min(len(content_a ^ content_b), 6)) / 6.0,
        same_bag,
        same_bag * bigrams,
        same_bag * discord,
    )
    return np.array(values, dtype=np.float64)


@dataclass(frozen=True)
class VerifierWeights:
    """A fitted logistic regression over standardised ``FEATURES``."""

    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float
    provenance: dict[str, object]

    def to_json(self) -> str:
        body = {
            "feature_version": FEATURE_VERSION,
            "features": list(FEATURES),
            "mean": list(self.mean),
            "scale": list(self.scale),
            "coef": list(self.coef),
            "intercept": self.intercept,
            "provenance": self.provenance,
        }
        return json.dumps(body, indent=1) + "\n"

    @classmethod
    def load(cls, path: Path = WEIGHTS_PATH) -> VerifierWeights:
        body = json.loads(path.read_text(encoding="utf-8"))
        if body.get("feature_version") != FEATURE_VERSION or body.get("features") != list(FEATURES):
            raise ValueError(f"{path}: fitted for other features; refit the verifier")
        n = len(FEATURES)
        mean, scale, coef = (tuple(float(x) for x in body[k]) for k in ("mean", "scale", "coef"))
        if not (len(mean) == len(scale) == len(coef) == n) or min(scale) <= 0:
            raise ValueError(f"{path}: malformed weights")
        return cls(mean, scale, coef, float(body["intercept"]), dict(body["provenance"]))


class Verifier:
    """Scores (cached question, new question, cosine) with fitted weights."""

    def __init__(self, weights: VerifierWeights, min_probability: float) -> None:
        if not (math.isfinite(min_probability) and 0.0 <= min_probability <= 1.0):
            raise ValueError(f"min_probability must be within [0, 1], got {min_probability}")
        self.min_probability = min_probability
        self._mean = np.array(weights.mean)
        self._scale = np.array(weights.scale)
        self._coef = np.array(weights.coef)
        self._intercept = weights.intercept
        self._vetoes = [FEATURES.index(name) for name in VETOES]

    def probability(self, first: str, second: str, cosine: float) -> float:
        return float(self.probabilities(features(first, second, cosine)[None, :])[0])

    def probabilities(self, rows: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """The model's probabilities; 0 where a cross-check vetoes."""
        z = ((rows - self._mean) / self._scale) @ self._coef + self._intercept
        vetoed = (rows[:, self._vetoes] > 0.5).any(axis=1)
        out: npt.NDArray[np.float64] = np.where(vetoed, 0.0, 1.0 / (1.0 + np.exp(-z)))
        return out

    def accepts(self, first: str, second: str, cosine: float) -> bool:
        return self.probability(first, second, cosine) >= self.min_probability
