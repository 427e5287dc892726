"""One scope's vectors: FAISS inner product over L2-normalised rows (= cosine).

A scope starts exact (``IndexFlatIP``). When it reaches ``AnnSettings.min_entries`` it is
rebuilt as an inverted-file index (``IndexIVFFlat``, ``nlist`` lists, ``nprobe`` searched),
chosen by ``make bench-cache``: at 1M entries it answers in a few milliseconds where exact
search takes tens, with near-duplicate recall@1 close to 1, and it supports removal (a hash
table maps ids to places), so no tombstones are needed. The rebuild (training and adding)
runs in a background thread on a copy; searches keep using the exact index meanwhile, and
the adds and removals made in between are replayed on the new index before it is swapped in.
An IVF scope that grows ``GROWTH`` times past the size it was trained for is rebuilt the same
way with more lists (``AnnSettings.nlist``).
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

Rows = npt.NDArray[np.float32]
GROWTH = 8  # an IVF scope is rebuilt with more lists when it has grown this many times


@dataclass(frozen=True)
class AnnSettings:
    min_entries: int = 20_000  # a scope this large becomes approximate
    nprobe: int = 16

    def nlist(self, n: int) -> int:
        """About 4 sqrt(n) lists, a power of two, trained on 40 rows per list at most."""
        return max(16, 1 << round(math.log2(4 * math.sqrt(n))))

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


class ScopeIndex:
    """The entries of one (tenant, scope): FAISS ids, vectors and the exact-match keys."""

    def __init__(self, dim: int, namespace: str, ann: AnnSettings | None = None) -> None:
        self.namespace = namespace
        self.exact: dict[str, int] = {}  # normalised query -> id
        self.ids: set[int] = set()
        self._dim = dim
        self._ann = ann
        self._index: Any = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self._approximate = False
        self._trained_for = 0  # entries the IVF was trained for (0 = exact)
        self._rebuild: Future[Any] | None = None
        self._pending: list[tuple[str, int, Rows | None]] = []  # ops made during a rebuild

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def kind(self) -> str:
        return "ivf" if self._approximate else "flat"

    @property
    def faiss_index(self) -> Any:
        """The FAISS index searched now (for measurements)."""
        return self._index

    def add(self, vid: int, vector: Rows, key: str) -> None:
        self._adopt_rebuild()
        row = np.ascontiguousarray(vector.reshape(1, self._dim), dtype=np.float32)
        self._index.add_with_ids(row, np.array([vid], dtype=np.int64))
        if self._rebuild is not None:
            self._pending.append(("add", vid, row))
        self.ids.add(vid)
        self.exact[key] = vid
        self._maybe_start_rebuild()

    def add_many(self, vids: list[int], vectors: Rows, keys: list[str]) -> None:
        """Adds rows in bulk (a restore); ``keys[i]`` is the exact-match key of ``vids[i]``."""
        self._adopt_rebuild()
        rows = np.ascontiguousarray(vectors.reshape(len(vids), self._dim), dtype=np.float32)
        self._index.add_with_ids(rows, np.array(vids, dtype=np.int64))
        if self._rebuild is not None:
            self._pending.extend(("add", v, rows[i : i + 1]) for i, v in enumerate(vids))
        self.ids.update(vids)
        self.exact.update(zip(keys, vids, strict=True))
        self._maybe_start_rebuild()

    def export(self) -> tuple[npt.NDArray[np.int64], Rows]:
        """A copy of (ids, vectors): row i of the vectors is the one of ids[i]."""
        ids = np.fromiter(self.ids, dtype=np.int64, count=len(self.ids))
        if self._approximate:
            found = self._index.reconstruct_batch(ids) if len(ids) else np.zeros((0, self._dim))
            rows: Rows = np.asarray(found, dtype=np.float32).reshape(len(ids), self._dim)
            return ids, rows
        ids = faiss.vector_to_array(self._index.id_map).astype(np.int64)
        total = int(self._index.ntotal)
        vectors = np.asarray(self._index.index.reconstruct_n(0, total), dtype=np.float32)
        return ids, vectors.reshape(total, self._dim)

    def remove(self, vid: int, key: str) -> None:
        self._adopt_rebuild()
        self._remove_from(self._index, self._approximate, vid)
        if self._rebuild is not None:
            self._pending.append(("remove", vid, None))
        self.ids.discard(vid)
        if self.exact.get(key) == vid:
            del self.exact[key]

    def search(self, vector: Rows, k: int) -> list[tuple[int, float]]:
        """Up to ``k`` (id, inner product) pairs, best first."""
        self._adopt_rebuild()
        k = min(k, len(self.ids))
        if k <= 0:
            return []
        row = np.ascontiguousarray(vector.reshape(1, self._dim), dtype=np.float32)
        scores, ids = self._index.search(row, k)
        return [(int(i), float(s)) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0]

    def wait_for_rebuild(self) -> None:
        """Blocks until a running rebuild is swapped in (tests and benchmarks)."""
        if self._rebuild is not None:
            self._rebuild.result()
            self._adopt_rebuild()

    @staticmethod
    def _remove_from(index: Any, approximate: bool, vid: int) -> None:
        ids = np.array([vid], dtype=np.int64)
        index.remove_ids(faiss.IDSelectorArray(ids) if approximate else faiss.IDSelectorBatch(ids))

    def _maybe_start_rebuild(self) -> None:
        ann = self._ann
        if ann is None or self._rebuild is not None or len(self.ids) < ann.min_entries:
            return
        if self._approximate and len(self.ids) < GROWTH * self._trained_for:
            return  # retrained (more lists) each time the scope has grown GROWTH times
        ids, vectors = self.export()
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scope-index-rebuild")
        self._rebuild = pool.submit(_build_ivf, ids, vectors, ann)
        pool.shutdown(wait=False)

    def _adopt_rebuild(self) -> None:
        if self._rebuild is None or not self._rebuild.done():
            return
        built = self._rebuild.result()  # a failed build raises here, never hidden
        for op, vid, row in self._pending:
            if op == "add":
                built.add_with_ids(row, np.array([vid], dtype=np.int64))
            else:
                self._remove_from(built, True, vid)
        self._index, self._approximate = built, True
        self._trained_for = int(built.ntotal) - sum(1 for op in self._pending if op[0] == "add")
        self._rebuild, self._pending = None, []


def _build_ivf(ids: npt.NDArray[np.int64], vectors: Rows, ann: AnnSettings) -> Any:
    dim = vectors.shape[1]
    nlist = ann.nlist(len(ids))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(0)
    size = min(len(vectors), 40 * nlist, 100_000)
    sample = vectors[rng.choice(len(vectors), size, replace=False)]
    index.cp.niter = 10
    index.train(sample)
    index.set_direct_map_type(faiss.DirectMap.Hashtable)  # type: ignore[attr-defined]
    index.add_with_ids(vectors, ids)
    index.nprobe = ann.nprobe
    return index
