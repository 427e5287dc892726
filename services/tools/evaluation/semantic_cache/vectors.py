"""Embeds a file's texts once and keeps the vectors on disk, outside git (``.cache/``).

The cache file is named by the sha256 of the texts and the embedder's version, so another
file, another embedder or edited data never reuse stale vectors.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from services.semantic_cache.embedder import Embedder, Vectors

DEFAULT_CACHE_DIR = Path(".cache/semantic-eval")


class VectorTable:
    """The vector of every distinct text of a file (row ``row[text]``)."""

    def __init__(self, texts: Sequence[str], vectors: Vectors) -> None:
        self.row = {text: i for i, text in enumerate(texts)}
        self.vectors = vectors

    def of(self, texts: Sequence[str]) -> Vectors:
        rows: Vectors = self.vectors[[self.row[t] for t in texts]]
        return rows


def embed_cached(
    embedder: Embedder, texts: Sequence[str], cache_dir: Path, *, batch: int = 64
) -> VectorTable:
    distinct = sorted(set(texts))
    digest = hashlib.sha256(embedder.version.encode())
    for text in distinct:
        digest.update(text.encode("utf-8") + b"\0")
    path = cache_dir / f"{digest.hexdigest()[:24]}.npy"
    if path.is_file():
        vectors = np.load(path)
        if vectors.shape == (len(distinct), embedder.dim):
            return VectorTable(distinct, vectors)
    order = sorted(range(len(distinct)), key=lambda i: len(distinct[i]))  # less padding
    out = np.zeros((len(distinct), embedder.dim), dtype=np.float32)
    started = time.monotonic()
    for start in range(0, len(order), batch):
        chunk = order[start : start + batch]
        out[chunk] = embedder.embed([distinct[i] for i in chunk])
        if start // batch % 50 == 0:
            done = start + len(chunk)
            rate = done / max(time.monotonic() - started, 1e-9)
            print(f"  embedded {done}/{len(order)} ({rate:.0f}/s)", file=sys.stderr)
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.npy")
    np.save(partial, out)
    partial.replace(path)
    return VectorTable(distinct, out)
