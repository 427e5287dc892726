"""Reference: the semantic cache's embedder alone, one sentence at a time and batched."""

from __future__ import annotations

import time
from typing import Any

from cachemesh.loadtest.stats import latency_summary
from services.semantic_cache.embedder import Embedder


def embedder_reference(embedder: Embedder, sentences: list[str], batch: int) -> dict[str, Any]:
    embedder.embed(sentences[:batch])  # the first run allocates
    single: list[float] = []
    for sentence in sentences:
        started = time.perf_counter()
        embedder.embed([sentence])
        single.append(time.perf_counter() - started)
    started = time.perf_counter()
    for i in range(0, len(sentences), batch):
        embedder.embed(sentences[i : i + batch])
    batched_s = time.perf_counter() - started
    return {
        "sentences": len(sentences),
        "single": {
            "latency_ms": latency_summary(single),
            "sentences_per_s": round(len(single) / sum(single), 1),
        },
        "batched": {"batch": batch, "sentences_per_s": round(len(sentences) / batched_s, 1)},
    }
