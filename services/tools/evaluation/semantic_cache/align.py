"""Does the embedder know more than its pooled cosine? A token-alignment check, nothing fitted.

BERTScore-style: each token of one question is matched to its most similar token of the other
(cosine of the embedder's last hidden states); precision and recall are the mean best matches
of each side, F1 their harmonic mean. Ranking a file's report-half pairs by that F1 and by the
pooled cosine, the precision each reaches at recall floors says whether token-level evidence
from the same model could feed a stronger verifier (``python -m
services.tools.evaluation.semantic_cache align``). Nothing here is used when serving.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from services.semantic_cache.embedder import MiniLMEmbedder, Vectors
from services.tools.evaluation.semantic_cache.datasets import Pair
from services.tools.evaluation.semantic_cache.protocols import F64
from services.tools.evaluation.semantic_cache.vectors import VectorTable

FLOORS = (0.1, 0.3, 0.5)
BATCH = 256


def alignment_f1(a: Vectors, b: Vectors) -> float:
    """Greedy token matching of two L2-normalised state matrices (tokens x dim)."""
    if len(a) == 0 or len(b) == 0:
        return 0.0
    sim = a @ b.T
    recall, precision = float(sim.max(axis=1).mean()), float(sim.max(axis=0).mean())
    total = precision + recall
    return 2 * precision * recall / total if total > 0 else 0.0


def precision_at_recall(
    score: F64, labels: npt.NDArray[np.bool_], floor: float
) -> dict[str, float]:
    """Serve the pairs scoring highest until ``floor`` of the positives are served."""
    order = np.argsort(-score, kind="stable")
    right = np.cumsum(labels[order])
    needed = floor * labels.sum()
    served = int(np.searchsorted(right, needed)) + 1
    hits_right = int(right[served - 1])
    return {
        "recall_at_least": floor,
        "precision": round(hits_right / served, 4),
        "wrong": served - hits_right,
    }


def compare(
    embedder: MiniLMEmbedder, pairs: Sequence[Pair], table: VectorTable
) -> dict[str, object]:
    labels = np.array([p.label for p in pairs], dtype=bool)
    if not labels.any() or labels.all():
        raise ValueError("the alignment check needs positive and negative pairs")
    cosine = np.einsum(
        "ij,ij->i", table.of([p.first for p in pairs]), table.of([p.second for p in pairs])
    ).astype(np.float64)
    f1 = np.zeros(len(pairs))
    for start in range(0, len(pairs), BATCH):
        chunk = pairs[start : start + BATCH]
        firsts = embedder.token_states([p.first for p in chunk])
        seconds = embedder.token_states([p.second for p in chunk])
        for k, (a, b) in enumerate(zip(firsts, seconds, strict=True)):
            f1[start + k] = alignment_f1(a, b)
    return {
        "pairs": len(pairs),
        "positives": int(labels.sum()),
        "pooled_cosine": [precision_at_recall(cosine, labels, f) for f in FLOORS],
        "token_alignment_f1": [precision_at_recall(f1, labels, f) for f in FLOORS],
    }
