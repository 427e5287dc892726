"""Start-up memory of a large shard: a fresh process restores a snapshot (make bench-cache).

``write_snapshot`` writes a format-3 snapshot of one scope holding one entry per vector
(200-byte answers, a fixed expiry) with the service's own encoder. ``measure`` then starts
``python -m services.tools.bench.semantic_cache.startup <directory> <now_ms>``: a fresh process
that opens it as the service's warm-up does (``Snapshotter.open``, default ``AnnSettings``,
one FAISS thread), waits until every scope's index is built, and reports its peak RSS
(``VmHWM``) against its RSS once settled (``VmRSS``), both from ``/proc/self/status``.
"""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from services.common.clock import ManualClock
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.index import AnnSettings
from services.semantic_cache.persistence import SnapshotStore
from services.semantic_cache.records import Answer, CacheContents, Entry
from services.semantic_cache.snapshotter import Snapshotter

VERSION = "bench@1"
DAY_MS = 86_400_000


class _Fixed:
    """An embedder that is never called (a restore does not embed)."""

    version = VERSION

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def embed(self, texts: list[str]) -> npt.NDArray[np.float32]:
        raise AssertionError("restore does not embed")


def write_snapshot(directory: Path, vectors: npt.NDArray[np.float32], now_ms: int) -> int:
    """One scope, one entry per row; returns the file's size in bytes."""
    answer = Answer(b"x" * 200, "end_turn", 50, False)
    entries = tuple(
        Entry(f"{i:032x}", "t", "s", "", f"question {i}", answer, now_ms, VERSION, now_ms + DAY_MS)
        for i in range(len(vectors))
    )
    store = SnapshotStore(directory)
    store.prepare()
    try:
        return store.save(CacheContents(VERSION, vectors.shape[1], entries, vectors), now_ms)
    finally:
        store.close()  # the directory's lock: the restore runs in another process


def measure(directory: Path, now_ms: int) -> dict[str, Any]:
    """Runs the restore in a fresh process; its report (peak and settled RSS, seconds)."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.tools.bench.semantic_cache.startup",
            str(directory),
            str(now_ms),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


async def _restore(directory: Path, now_ms: int, dim: int) -> dict[str, Any]:
    cache = SemanticCache(_Fixed(dim), ManualClock(now_ms), max_entries=10**9, ann=AnnSettings())
    started = time.perf_counter()
    report = await Snapshotter(SnapshotStore(directory), ManualClock(now_ms), 0).open(cache)
    restored_s = time.perf_counter() - started
    cache.wait_for_indexes()
    ready_s = time.perf_counter() - started
    gc.collect()
    peak, settled = _status_kb("VmHWM"), _status_kb("VmRSS")
    return {
        "entries": 0 if report is None else report.restored,
        "restore_s": round(restored_s, 1),
        "index_ready_s": round(ready_s, 1),
        "peak_rss_mb": round(peak / 1024),
        "settled_rss_mb": round(settled / 1024),
        "peak_over_settled": round(peak / settled, 2),
        "index_kinds": sorted(cache.index_kinds()),
    }


def _main(argv: list[str]) -> int:
    directory, now_ms = Path(argv[0]), int(argv[1])
    faiss.omp_set_num_threads(1)
    with (directory / "semantic-cache.snapshot").open("rb") as file:
        dim = json.loads(file.readline())["dim"]
    print(json.dumps(asyncio.run(_restore(directory, now_ms, dim))))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
