"""The approximate index of a large scope: when it is built, its lists, how it is trained.

A scope becomes an inverted-file index (``IndexIVFFlat``, inner product) at
``AnnSettings.min_entries`` entries, with about 4 sqrt(n) lists trained on a fixed random
sample of its rows, and is rebuilt with more lists each time it has grown ``GROWTH`` times.
``sample_positions`` names the training rows, so a background rebuild and a restore of the
same rows build the same index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

Rows = npt.NDArray[np.float32]
Ids = npt.NDArray[np.int64]
GROWTH = 8  # an IVF scope is rebuilt with more lists when it has grown this many times


@dataclass(frozen=True)
class AnnSettings:
    min_entries: int = 20_000  # a scope this large becomes approximate
    nprobe: int = 16
    threads: int = 1  # FAISS threads of a build (each building thread sets its own)

    def nlist(self, n: int) -> int:
        """About 4 sqrt(n) lists, a power of two, trained on 40 rows per list at most."""
        return max(16, 1 << round(math.log2(4 * math.sqrt(n))))

    def approximate(self, n: int) -> bool:
        """Whether a scope of ``n`` rows built at once (a rebuild, a restore) is an IVF."""
        return n >= self.min_entries

    def trained_for(self, n: int) -> int | None:
        """The size a scope grown one entry at a time to ``n`` was last built as IVF at
        (``min_entries``, then each ``GROWTH`` times more); None while it is still exact."""
        if self.min_entries <= 0:
            return n
        if n < self.min_entries:
            return None
        size = self.min_entries
        while size * GROWTH <= n:
            size *= GROWTH
        return size


def sample_positions(n: int, nlist: int) -> Ids:
    """Which of ``n`` rows an IVF of ``nlist`` lists trains on, in training order."""
    size = min(n, 40 * nlist, 100_000)
    return np.random.default_rng(0).choice(n, size, replace=False).astype(np.int64)


def use_threads(ann: AnnSettings) -> None:
    """Sets the calling thread's FAISS (OpenMP) threads to ``ann.threads``."""
    faiss.omp_set_num_threads(ann.threads)


def train_ivf(sample: Rows, nlist: int, ann: AnnSettings) -> Any:
    """An empty IVF-Flat trained on ``sample``, searching ``ann.nprobe`` lists, removal by id.

    Sets the calling thread's FAISS threads to ``ann.threads`` first: OpenMP threads are a
    per-thread setting, and a worker thread would otherwise use every core.
    """
    use_threads(ann)
    dim = sample.shape[1]
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = 10
    index.train(sample)
    index.set_direct_map_type(faiss.DirectMap.Hashtable)  # type: ignore[attr-defined]
    index.nprobe = ann.nprobe
    return index


def remove_ids(index: Any, approximate: bool, vids: Ids) -> None:
    """Removes ``vids`` (an IVF's hash-table direct map takes an id array, flat a batch)."""
    selector = faiss.IDSelectorArray(vids) if approximate else faiss.IDSelectorBatch(vids)
    index.remove_ids(selector)
