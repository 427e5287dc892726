"""Fits the verifier's logistic regression on fit halves (PAWS and GPTCache's mock data only).

Training rows: every labelled pair of a file with negatives, and for every file the retrieval
candidates of its fit half (a second question against the stored first questions, top k with
cosine >= ``MIN_COSINE``), labelled right or wrong exactly as the retrieval protocol scores
them, so the model also learns the near neighbours a real cache meets. Each file weighs the
same in the loss, and within a file each class weighs the same.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np

from services.semantic_cache.query import normalise
from services.semantic_cache.verifier import FEATURES, VerifierWeights, features
from services.tools.evaluation.semantic_cache.datasets import PairsFile
from services.tools.evaluation.semantic_cache.protocols import F64, TOP_K
from services.tools.evaluation.semantic_cache.vectors import VectorTable

MIN_COSINE = 0.6
LICENSED_FOR_FITTING = ("paws_wiki_dev", "gptcache_mock_data")  # Quora: evaluation only


def training_rows(data: PairsFile, table: VectorTable) -> tuple[F64, F64]:
    pairs = data.half("fit")
    rows: list[F64] = []
    labels: list[float] = []
    if not data.all_positive:
        a, b = table.of([p.first for p in pairs]), table.of([p.second for p in pairs])
        for p, cos in zip(pairs, np.einsum("ij,ij->i", a, b).tolist(), strict=True):
            rows.append(features(normalise(p.first), normalise(p.second), float(cos)))
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
            rows.append(features(entry, query, float(score)))
            labels.append(float(entry == own and p.label))
    return np.array(rows), np.array(labels)


def fit(
    files: Sequence[PairsFile], tables: Sequence[VectorTable], *, l2: float = 1e-3
) -> VerifierWeights:
    for data in files:
        if data.name not in LICENSED_FOR_FITTING:
            raise ValueError(f"{data.name}: its licence does not allow fitting what ships")
    parts = [training_rows(d, t) for d, t in zip(files, tables, strict=True)]
    x = np.concatenate([p[0] for p in parts])
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
        "halves": "fit halves only (sha256 of the first question, even first byte)",
        "files_sha256": {d.name: _digest(d) for d in files},
        "l2": l2,
        "model": "logistic regression on standardised features, class- and file-balanced",
    }
    return VerifierWeights(
        tuple(mean.tolist()), tuple(scale.tolist()), tuple(coef.tolist()), intercept, provenance
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


def weights_path_note(path: Path) -> str:
    return f"weights written to {path} ({len(FEATURES)} features)"
