"""The index a scope really holds at a size, through the cache's own code, against raw FAISS.

``as_grown`` grows the cache's ``ScopeIndex`` ``GROW_STEP`` rows at a time, as stores grow it
(exact up to ``min_entries``, then IVF, retrained in the background as it grows: at 1M it
holds the lists of its last rebuild, at 160k). Each background rebuild is let finish before
the next rows come, as in a live scope, which grows one embedded store at a time, far slower
than a rebuild takes; added as fast as the bench can, the scope would outrun its rebuilds
and hold whatever lists the race left. Raw FAISS is then built over the same vectors with
the same kind, lists and nprobe. Their latencies are measured on ``LATENCY_QUERIES``
near-duplicate queries taking turns query by query (which one goes first alternates), after
a warm-up, so the noise of a shared machine falls on both alike; per query, the wall time
and the thread's CPU time (the wall time less any wait for a core).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from services.semantic_cache.index import AnnSettings, ScopeIndex
from services.tools.bench.semantic_cache.indexes import Candidate, build, row, search_one_by_one
from services.tools.bench.semantic_cache.synthetic_vectors import near_duplicates

F32 = npt.NDArray[np.float32]
GROW_STEP = 10_000  # the service's index is grown this many rows at a time
LATENCY_QUERIES = 2_000
WARM_UP = 50


def as_grown(
    corpus: F32, probes: F32, truth: npt.NDArray[np.int64], ann: AnnSettings, seed: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Two table rows (raw FAISS of the same kind, then the cache's ScopeIndex) and their
    side-by-side latencies."""
    index, grown_s = _grow(corpus, ann)
    nlist = getattr(index.faiss_index, "nlist", None)
    if nlist is None:
        raw, raw_s = build(Candidate("flat", {}), corpus)
        kind, raw_name = "flat", "flat (as grown: still exact)"
    else:
        raw, raw_s = build(Candidate("ivf", {"nlist": nlist, "nprobe": ann.nprobe}), corpus)
        kind = f"ivf nlist={nlist} nprobe={ann.nprobe}"
        raw_name = f"{kind} (as grown: last rebuilt at {index.trained_for})"
    own_top = np.array([_top(index.search(p, 8)) for p in probes], dtype=np.int64)
    raw_top, _ = search_one_by_one(raw, probes)
    queries = near_duplicates(corpus, WARM_UP + LATENCY_QUERIES, seed=seed)
    own, base = _interleaved(lambda q: index.search(q, 8), lambda q: raw.search(q, 8), queries)
    rows = [
        row(raw_name, raw, raw_s, raw_top, truth, base["wall"]),
        row(
            f"cache ScopeIndex, grown ({kind})",
            index.faiss_index,
            grown_s,
            own_top,
            truth,
            own["wall"],
        ),
    ]
    mine, theirs = _percentiles(own), _percentiles(base)
    pair = {
        "index": kind,
        "queries": LATENCY_QUERIES,
        "measured": "interleaved query by query, one FAISS thread, after a warm-up",
        "cache_scope_index": mine,
        "raw_faiss": theirs,
        "p50_ratio": round(mine["p50_ms"] / theirs["p50_ms"], 3),
        "p99_ratio": round(mine["p99_ms"] / theirs["p99_ms"], 3),
    }
    return rows, pair


def _grow(corpus: F32, ann: AnnSettings) -> tuple[ScopeIndex, float]:
    index = ScopeIndex(corpus.shape[1], "", ann)
    started = time.perf_counter()
    for start in range(0, len(corpus), GROW_STEP):
        vids = list(range(start, min(start + GROW_STEP, len(corpus))))
        index.add_many(vids, corpus[start : vids[-1] + 1], [f"k{v}" for v in vids])
        index.wait_for_rebuild()  # a live scope grows far slower than a rebuild takes
    return index, time.perf_counter() - started


def _top(found: list[tuple[int, float]]) -> int:
    return found[0][0] if found else -1


def _interleaved(
    first: Callable[[F32], object], second: Callable[[F32], object], queries: F32
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per-query wall and CPU milliseconds of two searches taking turns."""
    times: tuple[dict[str, list[float]], dict[str, list[float]]] = (
        {"wall": [], "cpu": []},
        {"wall": [], "cpu": []},
    )
    for i in range(WARM_UP):  # not measured
        first(queries[i : i + 1])
        second(queries[i : i + 1])
    for i in range(WARM_UP, len(queries)):
        query = queries[i : i + 1]
        turns = ((first, times[0]), (second, times[1]))
        for search, out in turns if i % 2 == 0 else turns[::-1]:
            wall, cpu = time.perf_counter(), time.thread_time()
            search(query)
            out["cpu"].append((time.thread_time() - cpu) * 1000)
            out["wall"].append((time.perf_counter() - wall) * 1000)
    return times


def _percentiles(times: dict[str, list[float]]) -> dict[str, float]:
    wall, cpu = np.array(times["wall"]), np.array(times["cpu"])
    return {
        "p50_ms": round(float(np.percentile(wall, 50)), 3),
        "p99_ms": round(float(np.percentile(wall, 99)), 3),
        "mean_ms": round(float(wall.mean()), 3),
        "cpu_p50_ms": round(float(np.percentile(cpu, 50)), 3),
        "cpu_p99_ms": round(float(np.percentile(cpu, 99)), 3),
    }
