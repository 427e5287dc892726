"""The two protocols of the harness, over precomputed cosines and verifier probabilities.

Pairwise: would the cache serve the first question's answer to the second? A pair is a hit when
the normalised texts are equal, or when cosine >= t and the verifier's probability >= v; a hit
is right when the pair is labelled a paraphrase.

Retrieval (GPTCache's protocol on its mock data): every distinct first question is stored in one
cache and every second question looks it up, only the nearest candidate may be served (as
``SemanticCache.check`` does: the verifier refuses, it never promotes a runner-up). A hit is
right when the served entry's text equals the query, or equals the pair's own first question and
the pair is a positive; any other hit is wrong. Recall is right hits over the queries that have
a right answer in the cache (positive pairs, and queries identical to a stored question).

``v = 0`` turns the verification off (its vetoes too, as ``Verifier`` does): the plain-embedding
baseline. ``margin`` > 0 refuses an ambiguous lookup: a
second acceptable candidate (another entry, so another answer) within ``margin`` of the nearest
one's cosine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import faiss
import numpy as np
import numpy.typing as npt

from services.semantic_cache.query import normalise
from services.tools.evaluation.semantic_cache.datasets import Pair
from services.tools.evaluation.semantic_cache.vectors import VectorTable

F64 = npt.NDArray[np.float64]
Bools = npt.NDArray[np.bool_]
ProbabilityFn = Callable[[Sequence[str], Sequence[str], F64], F64]
TOP_K = 8


@dataclass(frozen=True)
class Outcome:
    hits: int
    right: int
    positives: int

    @property
    def wrong(self) -> int:
        return self.hits - self.right

    @property
    def precision(self) -> float | None:
        return self.right / self.hits if self.hits else None

    @property
    def recall(self) -> float:
        return self.right / self.positives if self.positives else 0.0

    def as_dict(self) -> dict[str, object]:
        p = self.precision
        return {
            "precision": None if p is None else round(p, 4),
            "recall": round(self.recall, 4),
            "right": self.right,
            "wrong": self.wrong,
            "misses": self.positives - self.right,
            "hits": self.hits,
        }


class Candidates:
    """Per query: up to k candidates (cosine, verifier probability, right?), best first."""

    def __init__(
        self, cos: F64, prob: F64, right: Bools, exact: Bools, exact_right: Bools, label: Bools
    ) -> None:
        self.cos, self.prob, self.right, self.label = cos, prob, right, label
        self.exact, self.exact_right = exact, exact_right  # an exact-match entry exists; right?
        # the recall's denominator: queries with a right answer in the cache (a positive pair,
        # or, in retrieval, an entry identical to the query)
        self.answerable = int((label | (exact & exact_right)).sum())

    def outcome(self, t: float, v: float, margin: float = 0.0) -> Outcome:
        ok = (self.cos >= t) & (self.prob >= v)
        served = ok[:, 0].copy()  # only the nearest candidate is ever served
        if margin > 0 and ok.shape[1] > 1:
            runner_up = np.where(ok[:, 1:], self.cos[:, 1:], -1.0).max(axis=1)
            served &= runner_up < self.cos[:, 0] - margin
        hits = self.exact | served
        right = np.where(self.exact, self.exact_right, self.right[:, 0] & served)
        return Outcome(int(hits.sum()), int(right.sum()), self.answerable)


def pairwise(pairs: Sequence[Pair], table: VectorTable, probability: ProbabilityFn) -> Candidates:
    firsts = [normalise(p.first) for p in pairs]
    seconds = [normalise(p.second) for p in pairs]
    a = table.of([p.first for p in pairs])
    b = table.of([p.second for p in pairs])
    cos = np.clip(np.einsum("ij,ij->i", a, b).astype(np.float64), 0.0, 1.0)
    label = np.array([p.label for p in pairs], dtype=bool)
    exact = np.array([f == s for f, s in zip(firsts, seconds, strict=True)], dtype=bool)
    prob = probability(firsts, seconds, cos)
    return Candidates(cos[:, None], prob[:, None], label[:, None], exact, exact & label, label)


def retrieval(
    pairs: Sequence[Pair], table: VectorTable, probability: ProbabilityFn, k: int = TOP_K
) -> Candidates:
    entries: dict[str, str] = {}  # normalised first question -> its text as first seen
    for p in pairs:
        entries.setdefault(normalise(p.first), p.first)
    keys = list(entries)
    index = faiss.IndexFlatIP(table.vectors.shape[1])
    index.add(np.ascontiguousarray(table.of(list(entries.values()))))
    queries = np.ascontiguousarray(table.of([p.second for p in pairs]))
    scores, ids = index.search(queries, min(k, len(keys)))
    n, kk = ids.shape
    cos = np.where(ids >= 0, np.clip(scores, 0.0, 1.0), -1.0).astype(np.float64)
    right = np.zeros((n, kk), dtype=bool)
    firsts: list[str] = []
    seconds: list[str] = []
    exact = np.zeros(n, dtype=bool)
    for i, p in enumerate(pairs):
        query, own = normalise(p.second), normalise(p.first)
        exact[i] = query in entries
        for j in range(kk):
            entry = keys[ids[i, j]] if ids[i, j] >= 0 else ""
            right[i, j] = entry == query or (entry == own and p.label)
            firsts.append(entry)
            seconds.append(query)
    prob = probability(firsts, seconds, cos.reshape(-1)).reshape(n, kk)
    label = np.array([p.label for p in pairs], dtype=bool)
    return Candidates(cos, prob, right, exact, exact, label)
