"""Real embeddings grown to any size: Quora questions embedded once, perturbed in vector space.

Row i of a corpus of n rows is base question ``i mod b`` plus Gaussian noise of norm about
``spread`` (cosine ~0.8 to its base), renormalised, so rows are distinct points clustered the
way real questions are. Queries are near-duplicates of stored rows (noise norm ``near``,
cosine ~0.89, a paraphrase at the serving threshold): what a lookup looks like in vector
space.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from services.semantic_cache.embedder import l2_normalise

F32 = npt.NDArray[np.float32]


def grow(base: F32, n: int, seed: int, spread: float = 0.75, chunk: int = 100_000) -> F32:
    rng = np.random.default_rng(seed)
    dim = base.shape[1]
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        rows = np.arange(start, min(n, start + chunk)) % len(base)
        noise = rng.standard_normal((len(rows), dim), dtype=np.float32) * (spread / dim**0.5)
        out[start : start + len(rows)] = l2_normalise(base[rows] + noise)
    return out


def near_duplicates(corpus: F32, count: int, seed: int, near: float = 0.5) -> F32:
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(corpus), size=count, replace=False)
    dim = corpus.shape[1]
    noise = rng.standard_normal((count, dim), dtype=np.float32) * (near / dim**0.5)
    return l2_normalise(corpus[picks] + noise)
