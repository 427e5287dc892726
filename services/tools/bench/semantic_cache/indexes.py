"""Builds each candidate index over a corpus and measures it against exact (flat) search."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Candidate:
    name: str  # "flat", "ivf", "hnsw"
    params: dict[str, int]


def build(candidate: Candidate, corpus: F32) -> tuple[Any, float]:
    """The index with every row added (ids = row numbers) and the seconds it took."""
    dim = corpus.shape[1]
    started = time.perf_counter()
    ids = np.arange(len(corpus), dtype=np.int64)
    if candidate.name == "flat":
        index: Any = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        index.add_with_ids(corpus, ids)
    elif candidate.name == "ivf":
        nlist = candidate.params["nlist"]
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        size = min(len(corpus), 40 * nlist, 100_000)  # as index.py trains it
        sample = corpus[np.random.default_rng(0).choice(len(corpus), size, replace=False)]
        index.cp.niter = 10
        index.train(sample)
        # remove_ids and reconstruct by id
        index.set_direct_map_type(faiss.DirectMap.Hashtable)  # type: ignore[attr-defined]
        index.add_with_ids(corpus, ids)
        index.nprobe = candidate.params["nprobe"]
    elif candidate.name == "hnsw":
        index = faiss.IndexHNSWFlat(dim, candidate.params["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = candidate.params["efConstruction"]
        index.add(corpus)  # ids = row numbers; HNSW has no removal: tombstones + rebuild
        index.hnsw.efSearch = candidate.params["efSearch"]
    else:
        raise ValueError(candidate.name)
    return index, time.perf_counter() - started


def search_one_by_one(index: Any, queries: F32) -> tuple[npt.NDArray[np.int64], list[float]]:
    """Top-1 ids and per-query latencies (ms), one query at a time as a lookup does."""
    top = np.empty(len(queries), dtype=np.int64)
    latencies = []
    for i in range(len(queries)):
        started = time.perf_counter()
        _, ids = index.search(queries[i : i + 1], 8)
        latencies.append((time.perf_counter() - started) * 1000)
        top[i] = ids[0, 0]
    return top, latencies


def row(
    name: str,
    index: Any,
    build_s: float,
    top: npt.NDArray[np.int64],
    truth: npt.NDArray[np.int64],
    latencies: list[float],
) -> dict[str, Any]:
    """One measured index: its latencies, recall@1 against flat search, build time, size."""
    return {
        "index": name,
        "build_s": round(build_s, 2),
        "recall_at_1": round(float((top == truth).mean()), 4),
        "index_bytes_per_entry": round(index_bytes(index) / index.ntotal, 1),
        **summary(latencies),
    }


def index_bytes(index: Any) -> int:
    return int(faiss.serialize_index(index).size)


def summary(latencies: list[float]) -> dict[str, float]:
    arr = np.array(latencies)
    return {
        "p50_ms": round(float(np.percentile(arr, 50)), 3),
        "p99_ms": round(float(np.percentile(arr, 99)), 3),
        "mean_ms": round(float(arr.mean()), 3),
        "throughput_qps_one_thread": round(1000.0 / float(arr.mean()), 1),
    }
