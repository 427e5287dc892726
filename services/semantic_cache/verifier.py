"""The verification step: does a near neighbour really ask the same question?

Sentence embeddings confuse questions that share their words but not their meaning: "convert USD
to EUR" and "convert EUR to USD" (cosine 0.99), a negation, a changed number or name. Candidates
that are not exact matches are checked here, on the two texts, before they are served. The check
is a small logistic regression over features of the pair: the cosine, the logit of the project's
cross-encoder (``cross_encoder.py``: a network that reads both questions together, so word order,
negation and numbers are visible to it), and optionally lexical cross-features (word and bigram
overlap, word order among the shared words, numbers, negation, length, coverage). Which features
it uses, its weights and which lexical cross-checks veto outright (``VETOES``) are fitted offline
(``python -m services.tools.evaluation.semantic_cache fit``) on the tune slices of the fit halves
(PAWS, GPTCache's mock data, the generated near-misses) and shipped as JSON with their provenance
(``verifier_weights.json``). A candidate is served when no listed cross-check vetoes it and the
probability that the two questions mean the same is at least the configured
``min_probability``; ``min_probability`` 0 turns the whole step off (vetoes included), which is
the plain-embedding baseline of the harness.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from services.semantic_cache.cross_encoder import PairScorer
from services.semantic_cache.embedder import Embedder
from services.semantic_cache.folding import Folding
from services.semantic_cache.reading import Reader, Reading, shipped_reader

WEIGHTS_PATH = Path(__file__).with_name("verifier_weights.json")
FEATURE_VERSION = "cachemesh.verifier.features.v4"

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
CROSS_ENCODER = "cross_encoder_logit"
CATALOGUE = (*FEATURES, CROSS_ENCODER)  # the columns of ``rows``; the weights pick some
# Cross-checks that may refuse outright, whatever the model says (the weights list those they
# apply): the same content words in another order ("USD to EUR" / "EUR to USD"), different
# numbers, a number on one side only, a negation on one side only.
VETOES = ("same_words_reordered", "number_conflict", "number_one_side", "negation_mismatch")
REFUSED = "the verifier refused the nearest candidate"  # its probability is below the minimum
# A pair whose shared leading sentences were dropped, with no embedder to compare what is left.
NO_EMBEDDER = "the verifier has no embedder to compare the parts that differ"

F64 = npt.NDArray[np.float64]


def words(text: str) -> list[str]:
    """Casefolded word tokens; "don't" becomes "dont" (a negation)."""
    return _WORD.findall(text.casefold().replace("n't", "nt").replace("'", ""))


def _jaccard(a: AbstractSet[object], b: AbstractSet[object]) -> float:
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def _ngrams(tokens: list[str], n: int) -> set[object]:
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def _discordance(a: list[str], b: list[str]) -> float:
    """Share of pairs of words (each once in both texts) whose order differs.

    Counted in O(n log n) (the words counted once, the discordant pairs as the inversions of
    their positions in ``b``, with a Fenwick tree): two 16 kB questions took 2.5 s of a
    worker's CPU when each word was counted by scanning the list and every pair compared.
    """
    count_a, count_b = Counter(a), Counter(b)
    pos_b = {w: i for i, w in enumerate(b) if count_b[w] == 1}
    order = [pos_b[w] for w in a if count_a[w] == 1 and w in pos_b]
    n = len(order)
    if n < 2:
        return 0.0
    return _inversions(order, len(b)) / (n * (n - 1) // 2)


def _inversions(values: list[int], bound: int) -> int:
    """Pairs i < j with values[i] > values[j], for distinct values in range(bound)."""
    tree = [0] * (bound + 1)  # tree[k]: how many values seen so far fall in its range
    inversions = 0
    for seen, value in enumerate(values):
        k, not_above = value + 1, 0
        while k > 0:
            not_above += tree[k]
            k -= k & -k
        inversions += seen - not_above  # values seen so far that are greater
        k = value + 1
        while k <= bound:
            tree[k] += 1
            k += k & -k
    return inversions


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


def rows(
    firsts: Sequence[str],
    seconds: Sequence[str],
    cosines: Sequence[float],
    scorer: PairScorer | None,
) -> F64:
    """``CATALOGUE`` columns for (cached, new, cosine) triples; the cross-encoder's logit is 0
    when no scorer is given (weights that use it refuse to run without one)."""
    n = len(firsts)
    out = np.zeros((n, len(CATALOGUE)), dtype=np.float64)
    for i in range(n):
        out[i, : len(FEATURES)] = features(firsts[i], seconds[i], float(cosines[i]))
    if scorer is not None and n:
        out[:, -1] = scorer.logits(list(zip(firsts, seconds, strict=True)))
    return out


@dataclass(frozen=True)
class VerifierWeights:
    """A fitted logistic regression over standardised ``features`` (names of ``CATALOGUE``)."""

    features: tuple[str, ...]
    vetoes: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float
    provenance: dict[str, object]

    @property
    def needs_cross_encoder(self) -> bool:
        return CROSS_ENCODER in self.features

    def to_json(self) -> str:
        body = {
            "feature_version": FEATURE_VERSION,
            "features": list(self.features),
            "vetoes": list(self.vetoes),
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
        names = tuple(str(x) for x in body.get("features", ()))
        vetoes = tuple(str(x) for x in body.get("vetoes", ()))
        if (
            body.get("feature_version") != FEATURE_VERSION
            or not set(names) <= set(CATALOGUE)
            or not set(vetoes) <= set(VETOES)
        ):
            raise ValueError(f"{path}: fitted for other features; refit the verifier")
        n = len(names)
        mean, scale, coef = (tuple(float(x) for x in body[k]) for k in ("mean", "scale", "coef"))
        if not n or not (len(mean) == len(scale) == len(coef) == n) or min(scale) <= 0:
            raise ValueError(f"{path}: malformed weights")
        return cls(
            names, vetoes, mean, scale, coef, float(body["intercept"]), dict(body["provenance"])
        )


class Verifier:
    """Scores (cached question, new question, cosine) with fitted weights (and the
    cross-encoder when they use it) on what ``reader`` (``reading.py``; default: the shipped
    tokenizer's) says it can read of the two: the parts that differ, once the leading sentences
    they share are dropped, with those parts' own cosine (``embedder``)."""

    def __init__(
        self,
        weights: VerifierWeights,
        min_probability: float,
        cross_encoder: PairScorer | None = None,
        reader: Reader | None = None,
        embedder: Embedder | None = None,
    ) -> None:
        """Without ``embedder``, a pair sharing leading sentences is refused (nothing can give
        the cosine of the parts that differ)."""
        if not (math.isfinite(min_probability) and 0.0 <= min_probability <= 1.0):
            raise ValueError(f"min_probability must be within [0, 1], got {min_probability}")
        if weights.needs_cross_encoder and cross_encoder is None:
            raise ValueError("these verifier weights use the cross-encoder: pass one")
        self.min_probability = min_probability
        self.cross_encoder = cross_encoder if weights.needs_cross_encoder else None
        self.reader = reader if reader is not None else shipped_reader()
        self._embedder = embedder
        self._columns = [CATALOGUE.index(name) for name in weights.features]
        self._mean = np.array(weights.mean)
        self._scale = np.array(weights.scale)
        self._coef = np.array(weights.coef)
        self._intercept = weights.intercept
        self._vetoes = [CATALOGUE.index(name) for name in weights.vetoes]

    def rows(self, firsts: Sequence[str], seconds: Sequence[str], cosines: Sequence[float]) -> F64:
        return rows(firsts, seconds, cosines, self.cross_encoder)

    def probabilities(self, table: F64) -> F64:
        """The model's probabilities for ``rows``; 0 where a listed cross-check vetoes."""
        z = ((table[:, self._columns] - self._mean) / self._scale) @ self._coef + self._intercept
        vetoed = (table[:, self._vetoes] > 0.5).any(axis=1)
        out: F64 = np.where(vetoed, 0.0, 1.0 / (1.0 + np.exp(-z)))
        return out

    def probabilities_of(
        self, firsts: Sequence[str], seconds: Sequence[str], cosines: Sequence[float]
    ) -> F64:
        """The probabilities of the pairs; 0 for a pair the reader refuses (never scored)."""
        return self._assess(firsts, seconds, cosines)[0]

    def probability(self, first: str, second: str, cosine: float) -> float:
        return float(self.probabilities_of([first], [second], [cosine])[0])

    def accepts(self, first: str, second: str, cosine: float) -> bool:
        return self.accepts_all([(first, second, cosine)])[0]

    def accepts_all(self, checks: Sequence[tuple[str, str, float]]) -> list[bool]:
        """One verdict per (cached, new, cosine), scored in one batch (blocking: a thread)."""
        return [not refusal for refusal in self.verdicts(checks)]

    def verdicts(self, checks: Sequence[tuple[str, str, float]]) -> list[str]:
        """Per (cached, new, cosine), why it is refused ("" = accepted), scored in one batch
        (blocking: a thread). With ``min_probability`` 0 the step is off: nothing is scored,
        but the reader's refusals still hold (no cosine can see past them)."""
        if not checks:
            return []
        firsts, seconds, cosines = zip(*checks, strict=True)
        if self.min_probability <= 0.0:
            return [r.refusal for r in self._read(firsts, seconds, scored=False)]
        probabilities, refusals = self._assess(firsts, seconds, cosines)
        return [
            refusal or ("" if p >= self.min_probability else REFUSED)
            for p, refusal in zip(probabilities.tolist(), refusals, strict=True)
        ]

    def _read(
        self, firsts: Sequence[str], seconds: Sequence[str], *, scored: bool
    ) -> list[Reading]:
        ce = self.cross_encoder is not None
        # a Lookup's shortlist is read against one new question: its side is made once
        read: dict[str, Folding] = {}
        return [
            self.reader.read(
                a, b, cross_encoder=ce, scored=scored, folding=read.setdefault(b, Folding(b))
            )
            for a, b in zip(firsts, seconds, strict=True)
        ]

    def _assess(
        self, firsts: Sequence[str], seconds: Sequence[str], cosines: Sequence[float]
    ) -> tuple[F64, list[str]]:
        """The probabilities of what the reader lets through (0 for the rest), and why the
        rest was refused. A pair sharing no leading sentence is scored exactly as given."""
        readings = self._read(firsts, seconds, scored=True)
        refusals = [r.refusal for r in readings]
        cos = [float(c) for c in cosines]
        dropped = [i for i, r in enumerate(readings) if r.dropped and not r.refusal]
        if dropped and self._embedder is None:
            for i in dropped:
                refusals[i] = NO_EMBEDDER
        elif dropped and self._embedder is not None:
            texts = [t for i in dropped for t in (readings[i].first, readings[i].second)]
            vectors = self._embedder.embed(texts)
            for k, i in enumerate(dropped):
                cos[i] = min(1.0, max(0.0, float(vectors[2 * k] @ vectors[2 * k + 1])))
        out = np.zeros(len(refusals), dtype=np.float64)
        kept = [i for i, refusal in enumerate(refusals) if not refusal]
        if kept:
            table = self.rows(
                [readings[i].first for i in kept],
                [readings[i].second for i in kept],
                [cos[i] for i in kept],
            )
            out[kept] = self.probabilities(table)
        return out, refusals
