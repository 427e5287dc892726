"""Fits the verifier's logistic regression on the tune slices of the fit halves.

Files: PAWS dev, GPTCache's mock data and the generated near-misses (Quora is evaluation-only).
Rows come from each file's *tune* slice (``services.tools.verifier.splits``: a quarter of the fit
half the cross-encoder never trained on, so its logits there are as honest as on new traffic):
every labelled pair of a file with negatives, and for every file the retrieval candidates of
that slice (a second question against the slice's stored first questions, top k with cosine >=
``MIN_COSINE``), labelled right or wrong exactly as the retrieval protocol scores them, so the
model also learns the near neighbours a real cache meets. Each file weighs the same in the loss,
and within a file each class weighs the same. ``features`` names the columns used (of
``CATALOGUE``: the cosine, the cross-encoder's logit, lexical cross-features) and ``vetoes`` the
cross-checks that refuse outright.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np

from services.semantic_cache.cross_encoder import PairScorer
from services.semantic_cache.query import normalise
from services.semantic_cache.verifier import CATALOGUE, VerifierWeights, rows
from services.tools.evaluation.semantic_cache.datasets import Pair, PairsFile
from services.tools.evaluation.semantic_cache.protocols import F64, TOP_K
from services.tools.evaluation.semantic_cache.vectors import VectorTable
from services.tools.verifier.near_misses import NAME as GENERATED
from services.tools.verifier.splits import slice_of

MIN_COSINE = 0.6
LICENSED_FOR_FITTING = ("paws_wiki_dev", "gptcache_mock_data", GENERATED)  # Quora: evaluation
DEFAULT_FEATURES = CATALOGUE  # the cosine, the lexical cross-features, the cross-encoder


def tune_slice(data: PairsFile) -> tuple[Pair, ...]:
    return tuple(p for p in data.pairs if slice_of(p.first) == "tune")


def training_rows(
    data: PairsFile, table: VectorTable, scorer: PairScorer | None
) -> tuple[F64, F64]:
    pairs = tune_slice(data)
    firsts: list[str] = []
    seconds: list[str] = []
    cosines: list[float] = []
    labels: list[float] = []
    if not data.all_positive:
        a, b = table.of([p.first for p in pairs]), table.of([p.second for p in pairs])
        for p, cos in zip(pairs, np.einsum("ij,ij->i", a, b).tolist(), strict=True):
            firsts.append(normalise(p.first))
            seconds.append(normalise(p.second))
            cosines.append(float(cos))
            labels.append(float(p.label))
    entries = sorted({normalise(p.first): p.first for p in pairs}.items())
    index = faiss.IndexFlatIP(table.vectors.shape[1])
    index.add(np.ascontiguousarray(table.of([text for _, text in entries])))
    scores, ids = index.search(np.ascontiguousarray(table.of([p.second for p in pairs])), TOP_K)
    for i, p in enumerate(pairs):
        query, own = normalise(p.second), normalise(p.first)
        for score, j in zip(scores[i].tolist(), ids[i].tolist(), strict=True):
            entry = entries[j][0] if j >= 0 else ""
            if not entry or score < MIN_COSINE or entry == query:
                continue
            firsts.append(entry)
            seconds.append(query)
            cosines.append(float(score))
            labels.append(float(entry == own and p.label))
    return rows(firsts, seconds, cosines, scorer), np.array(labels)


def fit(
    files: Sequence[PairsFile],
    tables: Sequence[VectorTable],
    scorer: PairScorer | None,
    *,
    features: Sequence[str] = DEFAULT_FEATURES,
    vetoes: Sequence[str] = (),
    l2: float = 1e-3,
) -> VerifierWeights:
    for data in files:
        if data.name not in LICENSED_FOR_FITTING:
            raise ValueError(f"{data.name}: its licence does not allow fitting what ships")
    if "cross_encoder_logit" in features and scorer is None:
        raise ValueError("the cross-encoder's logit is a feature: a scorer is needed")
    columns = [CATALOGUE.index(name) for name in features]
    parts = [training_rows(d, t, scorer) for d, t in zip(files, tables, strict=True)]
    x = np.concatenate([p[0] for p in parts])[:, columns]
    y = np.concatenate([p[1] for p in parts])
    weight = np.concatenate([_balanced(p[1]) / len(parts) for p in parts])
    mean, scale = x.mean(axis=0), np.maximum(x.std(axis=0), 1e-6)
    z = (x - mean) / scale
    coef, intercept = _logistic(z, y, weight / weight.sum(), l2)
    counts = {
        d.name: {"rows": len(p[1]), "positives": int(p[1].sum())}
        for d, p in zip(files, parts, strict=True)
    }
    provenance: dict[str, object] = {
        "fitted_by": "python -m services.tools.evaluation.semantic_cache fit",
        "data": counts,
        "halves": "tune slices of the fit halves only (sha256 of the first question: even"
        " first byte, second byte divisible by 4); the cross-encoder trained on the rest",
        "files_sha256": {d.name: _digest(d) for d in files},
        "cross_encoder": None if scorer is None else scorer.version,
        "l2": l2,
        "model": "logistic regression on standardised features, class- and file-balanced",
    }
    return VerifierWeights(
        tuple(features),
        tuple(vetoes),
        tuple(mean.tolist()),
        tuple(scale.tolist()),
        tuple(coef.tolist()),
        intercept,
        provenance,
    )


def _balanced(labels: F64) -> F64:
    pos = max(labels.sum(), 1.0)
    neg = max(len(labels) - labels.sum(), 1.0)
    weights: F64 = np.where(labels > 0.5, 0.5 / pos, 0.5 / neg)
    return weights


def _logistic(z: F64, y: F64, w: F64, l2: float, steps: int = 3000) -> tuple[F64, float]:
    """Weighted L2-regularised logistic regression by Newton steps (small, exact, no deps)."""
    n, d = z.shape
    design = np.hstack([z, np.ones((n, 1))])
    theta = np.zeros(d + 1)
    penalty = np.full(d + 1, l2)
    penalty[-1] = 0.0
    for _ in range(min(steps, 50)):
        p = 1.0 / (1.0 + np.exp(-(design @ theta)))
        grad = design.T @ (w * (p - y)) + penalty * theta
        hess = (design * (w * p * (1 - p))[:, None]).T @ design + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-9:
            break
    coef: F64 = theta[:-1]
    return coef, float(theta[-1])


def _digest(data: PairsFile) -> str:
    digest = hashlib.sha256()
    for p in data.pairs:
        digest.update(f"{p.first}\0{p.second}\0{int(p.label)}\n".encode())
    return digest.hexdigest()[:16]


def weights_path_note(path: Path, weights: VerifierWeights) -> str:
    return f"weights written to {path} ({', '.join(weights.features)})"
