"""``python -m services.semantic_cache.bench`` (make bench-cache): writes one JSON file.

Measures, on real embeddings (Quora questions from ``../shared/data``, embedded once and kept
under ``.cache/``; never shipped), grown by perturbation to 10k, 100k and 1M rows: lookup
latency p50/p99 and one-thread throughput per index, near-duplicate recall@1 against exact
search, build time, index bytes per entry; and the embedder's throughput one text per call,
in batches, and through the micro-batcher with many concurrent callers.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from services.semantic_cache.batcher import MicroBatcher
from services.semantic_cache.bench.indexes import (
    Candidate,
    build,
    index_bytes,
    search_one_by_one,
    summary,
)
from services.semantic_cache.bench.vectors import grow, near_duplicates
from services.semantic_cache.embedder import Embedder, load_minilm_embedder
from services.semantic_cache.evaluation.datasets import load_pairs
from services.semantic_cache.evaluation.vectors import embed_cached
from services.semantic_cache.index import AnnSettings, ScopeIndex

SIZES = (10_000, 100_000, 1_000_000)
ANN = AnnSettings()  # the service's rule: nlist ~ 4 sqrt(n), a power of two
NPROBES = (4, 16, 32)
GROW_STEP = 10_000  # the service's index is grown this many rows at a time
HNSW = {"M": 32, "efConstruction": 80, "efSearch": 64}
HNSW_MAX = 100_000  # building it at 1M takes minutes on one core: measured below it only


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.semantic_cache.bench")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/paraphrase/qqp_dev.csv"))
    parser.add_argument("--base", type=int, default=20_000, help="distinct questions embedded")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache/semantic-eval"))
    parser.add_argument("--out", type=Path, default=Path("bench-results/semantic-cache-bench.json"))
    args = parser.parse_args(argv)
    faiss.omp_set_num_threads(1)
    started = time.monotonic()
    embedder = load_minilm_embedder(threads=1)
    texts = _questions(args.data, args.base)
    base = embed_cached(embedder, texts, args.cache_dir).of(texts)
    report: dict[str, Any] = {
        "embedder": embedder.version,
        "base_questions": len(texts),
        "faiss_threads": 1,
        "embedder_throughput": _embedder_rates(embedder, texts[:512]),
        "cache_python_bytes_per_entry": _python_bytes_per_entry(base),
        "sizes": {},
    }
    print(json.dumps(report["embedder_throughput"]), file=sys.stderr)
    for n in args.sizes:
        report["sizes"][str(n)] = _size(
            base, n, args.queries if n < 1_000_000 else args.queries // 2
        )
        print(json.dumps({n: report["sizes"][str(n)]["summary"]}), file=sys.stderr)
    report["seconds"] = round(time.monotonic() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    _print_tables(report)
    print(f"written to {args.out} in {report['seconds']} s")
    return 0


def _questions(path: Path, count: int) -> list[str]:
    pairs = load_pairs(path).pairs
    distinct = {t for p in pairs for t in (p.first, p.second)}
    ranked = sorted(distinct, key=lambda t: hashlib.sha256(t.encode()).digest())
    return ranked[:count]


def _embedder_rates(embedder: Embedder, texts: list[str]) -> dict[str, float]:
    embedder.embed(texts[:8])
    started = time.perf_counter()
    single = texts[:128]
    for text in single:
        embedder.embed([text])
    one = len(single) / (time.perf_counter() - started)
    started = time.perf_counter()
    for i in range(0, len(texts), 32):
        embedder.embed(texts[i : i + 32])
    batched = len(texts) / (time.perf_counter() - started)

    async def concurrent() -> tuple[float, int]:
        batcher = MicroBatcher(embedder, max_batch=32)
        began = time.perf_counter()
        await asyncio.gather(*(batcher.embed_one(t) for t in texts))
        return len(texts) / (time.perf_counter() - began), batcher.batches

    micro, calls = asyncio.run(concurrent())
    return {
        "texts_per_s_one_per_call": round(one, 1),
        "texts_per_s_batches_of_32": round(batched, 1),
        "texts_per_s_micro_batched_512_concurrent": round(micro, 1),
        "micro_batched_calls": calls,
    }


def _python_bytes_per_entry(base: np.ndarray, n: int = 20_000) -> float:
    """What a SemanticCache keeps per entry besides the index and the answer payload."""
    from services.common.clock import ManualClock
    from services.semantic_cache.cache import SemanticCache
    from services.semantic_cache.records import Answer, CacheContents, Entry

    class Fixed:
        version, dim = "bench@1", base.shape[1]

        def embed(self, texts: list[str]) -> np.ndarray:
            raise AssertionError("restore does not embed")

    clock = ManualClock()
    answer = Answer(b"x" * 200, "end_turn", 50, False)  # a typical short answer payload
    entries = tuple(
        Entry(
            f"{i:032x}",
            "tenant",
            "scope",
            "",
            f"question number {i} about a topic",
            answer,
            clock.now_ms(),
            "bench@1",
            clock.now_ms() + 86_400_000,  # its expiry, fixed at store as the cache does
        )
        for i in range(n)
    )
    contents = CacheContents("bench@1", base.shape[1], entries, grow(base, n, seed=7))
    tracemalloc.start()
    cache = SemanticCache(Fixed(), clock, max_entries=n)
    before = tracemalloc.get_traced_memory()[0]
    cache.restore(contents)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return round((after - before) / n, 1)


def _row(
    name: str, index: Any, build_s: float, top: np.ndarray, truth: np.ndarray, lat: list[float]
) -> dict[str, Any]:
    """One measured index: its latencies, recall@1 against flat search, build time, size."""
    return {
        "index": name,
        "build_s": round(build_s, 2),
        "recall_at_1": round(float((top == truth).mean()), 4),
        "index_bytes_per_entry": round(index_bytes(index) / index.ntotal, 1),
        **summary(lat),
    }


def _service_index(corpus: np.ndarray, probes: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """The cache's own ``ScopeIndex``, grown 10k rows at a time as stores grow it (flat up to
    ``min_entries``, then IVF, retrained in the background as it grows): what a lookup costs
    through the service's code, its Python wrapper included."""
    index = ScopeIndex(corpus.shape[1], "", ANN)
    started = time.perf_counter()
    for start in range(0, len(corpus), GROW_STEP):
        vids = list(range(start, min(start + GROW_STEP, len(corpus))))
        index.add_many(vids, corpus[start : vids[-1] + 1], [f"k{v}" for v in vids])
    index.wait_for_rebuild()
    grown_s = time.perf_counter() - started
    top = np.empty(len(probes), dtype=np.int64)
    latencies = []
    for i in range(len(probes)):
        began = time.perf_counter()
        found = index.search(probes[i : i + 1], 8)
        latencies.append((time.perf_counter() - began) * 1000)
        top[i] = found[0][0] if found else -1
    nlist = getattr(index.faiss_index, "nlist", None)
    kind = index.kind if nlist is None else f"{index.kind} nlist={nlist} nprobe={ANN.nprobe}"
    name = f"cache ScopeIndex, grown ({kind})"
    return _row(name, index.faiss_index, grown_s, top, truth, latencies)


def _size(base: np.ndarray, n: int, queries: int) -> dict[str, Any]:
    corpus = grow(base, n, seed=n)
    probes = near_duplicates(corpus, queries, seed=n + 1)
    flat, flat_s = build(Candidate("flat", {}), corpus)
    truth, latencies = search_one_by_one(flat, probes)
    rows = [_row("flat", flat, flat_s, truth, truth, latencies)]
    del flat
    nlist = ANN.nlist(n)
    ivf, ivf_s = build(Candidate("ivf", {"nlist": nlist, "nprobe": NPROBES[0]}), corpus)
    for nprobe in NPROBES:
        ivf.nprobe = nprobe
        top, latencies = search_one_by_one(ivf, probes)
        rows.append(_row(f"ivf nlist={nlist} nprobe={nprobe}", ivf, ivf_s, top, truth, latencies))
    del ivf
    rows.append(_service_index(corpus, probes, truth))
    trained = ANN.trained_for(n)
    if trained is not None and ANN.nlist(trained) != nlist:
        # the index a scope that grew to this size holds: lists trained at ``trained`` entries
        grown = {"nlist": ANN.nlist(trained), "nprobe": ANN.nprobe}
        ivf, ivf_s = build(Candidate("ivf", grown), corpus)
        top, latencies = search_one_by_one(ivf, probes)
        name = f"ivf nlist={grown['nlist']} nprobe={grown['nprobe']} (as grown: last rebuilt"
        rows.append(_row(f"{name} at {trained})", ivf, ivf_s, top, truth, latencies))
        del ivf
    if n <= HNSW_MAX:
        hnsw, hnsw_s = build(Candidate("hnsw", HNSW), corpus)
        top, latencies = search_one_by_one(hnsw, probes)
        rows.append(_row("hnsw M=32 efC=80 efS=64", hnsw, hnsw_s, top, truth, latencies))
    return {
        "queries": queries,
        "rows": rows,
        "summary": [(r["index"], r["p50_ms"], r["p99_ms"], r["recall_at_1"]) for r in rows],
    }


def _print_tables(report: dict[str, Any]) -> None:
    print(
        "| entries | index | p50 ms | p99 ms | qps (1 thread) | recall@1 vs flat | build s |",
        end="",
    )
    print(" bytes/entry |")
    print("|---|---|---|---|---|---|---|---|")
    for n, section in report["sizes"].items():
        for r in section["rows"]:
            print(
                f"| {n} | {r['index']} | {r['p50_ms']} | {r['p99_ms']} | "
                f"{r['throughput_qps_one_thread']} | {r['recall_at_1']} | {r['build_s']} | "
                f"{r['index_bytes_per_entry']} |"
            )
    print(json.dumps(report["embedder_throughput"]))


if __name__ == "__main__":
    sys.exit(main())
