"""One scope's vectors: FAISS inner product over L2-normalised rows (= cosine).

A scope starts exact (``IndexFlatIP``). When it reaches ``AnnSettings.min_entries`` it is
rebuilt as an inverted-file index (``IndexIVFFlat``, ``nlist`` lists, ``nprobe`` searched;
``ann.py``), chosen by ``make bench-cache``: at 1M entries it answers in under a millisecond
where exact search takes tens, with near-duplicate recall@1 close to 1, and it supports
removal (a hash table maps ids to places), so no tombstones are needed. The rebuild runs in a
background thread on a copy (``rebuild.py``); searches keep using the current index
meanwhile, and the adds and removals made in between are replayed on the new index before it
is swapped in. An IVF scope that grows ``GROWTH`` times past the size it was trained for is
rebuilt the same way with more lists (``AnnSettings.nlist``). A scope restored at once
(``ScopeIndex.sized``) gets its final kind of index from the start: no exact index built only
to be rebuilt, no copy of its vectors.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import faiss
import numpy as np

from services.semantic_cache.ann import GROWTH as GROWTH
from services.semantic_cache.ann import AnnSettings as AnnSettings
from services.semantic_cache.ann import Ids, Rows, remove_ids, sample_positions, train_ivf
from services.semantic_cache.query import folded
from services.semantic_cache.rebuild import Rebuild

log = logging.getLogger(__name__)

SLICE = 65_536  # rows per slice of a copy (a rebuild frees each once it has added it)


class ScopeIndex:
    """The entries of one (tenant, scope): FAISS ids, vectors and the exact-match keys (and
    the folded ones: ``folded_key``, each naming the entry added last with it still held: the
    last stored while the service runs; after a restore, which adds a snapshot's entries least
    recently used first, the most recently used at the snapshot)."""

    def __init__(self, dim: int, namespace: str, ann: AnnSettings | None = None) -> None:
        self.namespace = namespace
        self.exact: dict[str, int] = {}  # normalised query -> id
        # folded_key(normalised query) -> the id of the last entry added with it (stored, or
        # after a restore the most recently used)
        self.folded: dict[bytes, int] = {}
        # a folded key more than one entry holds (the same question in other case or spacing)
        # -> the others' ids, oldest first (a dict: any one removed at once): when the one
        # ``folded`` names goes (a drop, its TTL, an eviction), the key names the last one
        # added before it, not nothing (the older one was then found by search only, never
        # an exact hit)
        self._older: dict[bytes, dict[int, None]] = {}
        self.ids: set[int] = set()
        self._dim = dim
        self._ann = ann
        self._index: Any = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self._approximate = False
        self._trained_for = 0  # rows the IVF was built from (0 = exact)
        self._failed_at = 0  # rows at the last failed rebuild (0 = none): next try at GROWTH x
        self._rebuild: Rebuild | None = None

    @classmethod
    def sized(
        cls,
        dim: int,
        namespace: str,
        ann: AnnSettings | None,
        size: int,
        sample: Callable[[Ids], Rows],
    ) -> ScopeIndex:
        """An empty index for a scope about to get ``size`` rows at once (a restore): exact
        below ``ann.min_entries``, else an IVF trained now on ``sample(positions)``, the rows
        at those positions among the ``size`` (in that order): the rows a rebuild of the
        same scope trains on, so it is the same index."""
        index = cls(dim, namespace, ann)
        if ann is not None and ann.approximate(size):
            nlist = ann.nlist(size)
            index._index = train_ivf(sample(sample_positions(size, nlist)), nlist, ann)
            index._approximate, index._trained_for = True, size
        return index

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def kind(self) -> str:
        return "ivf" if self._approximate else "flat"

    @property
    def trained_for(self) -> int:
        """The rows its IVF was built from (0 while exact)."""
        return self._trained_for

    @property
    def faiss_index(self) -> Any:
        """The FAISS index searched now (for measurements)."""
        return self._index

    def add(self, vid: int, vector: Rows, key: str) -> None:
        self.add_many([vid], vector, [key])

    def add_many(self, vids: list[int], vectors: Rows, keys: list[str]) -> None:
        """Adds rows in bulk; ``keys[i]`` is the exact-match key of ``vids[i]``. While a
        rebuild runs it keeps a reference to the rows: they must not change afterwards."""
        self._adopt_rebuild()
        rows = np.ascontiguousarray(vectors.reshape(len(vids), self._dim), dtype=np.float32)
        ids = np.array(vids, dtype=np.int64)
        self._index.add_with_ids(rows, ids)
        if self._rebuild is not None:
            self._rebuild.added(ids, rows)
        self.ids.update(vids)
        self.exact.update(zip(keys, vids, strict=True))
        for vid, digest in zip(vids, map(folded_key, keys), strict=True):
            before = self.folded.get(digest)
            if before is not None and before != vid:
                self._older.setdefault(digest, {})[before] = None
            self.folded[digest] = vid
        self._maybe_start_rebuild()

    def export(self) -> tuple[Ids, Rows]:
        """A copy of (ids, vectors): row i of the vectors is the one of ids[i]."""
        parts = list(self.slices())
        if not parts:
            return np.zeros(0, np.int64), np.zeros((0, self._dim), np.float32)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def slices(self) -> Iterator[tuple[Ids, Rows]]:
        """The same copy, ``SLICE`` rows at a time (each slice a new array)."""
        if self._approximate:
            ids = np.fromiter(self.ids, dtype=np.int64, count=len(self.ids))
            for start in range(0, len(ids), SLICE):
                part = ids[start : start + SLICE]
                found = self._index.reconstruct_batch(part)
                yield part, np.asarray(found, dtype=np.float32).reshape(len(part), self._dim)
            return
        ids = faiss.vector_to_array(self._index.id_map).astype(np.int64)
        flat = self._index.index
        for start in range(0, len(ids), SLICE):
            count = min(SLICE, len(ids) - start)
            rows = np.asarray(flat.reconstruct_n(start, count), dtype=np.float32)
            yield ids[start : start + count], rows.reshape(count, self._dim)

    def remove(self, vid: int, key: str) -> None:
        self.remove_many([vid], [key])

    def remove_many(self, vids: list[int], keys: list[str]) -> None:
        """Removes rows in bulk; ``keys[i]`` is the exact-match key of ``vids[i]``. One FAISS
        call: an exact index compacts its whole array on each, so removing k rows one at a
        time cost k passes over the scope (10,000 expired together held the loop 6.5 s)."""
        self._adopt_rebuild()
        ids = np.array(vids, dtype=np.int64)
        remove_ids(self._index, self._approximate, ids)
        if self._rebuild is not None:
            self._rebuild.removed(ids)
        self.ids.difference_update(vids)
        for vid, key in zip(vids, keys, strict=True):
            if self.exact.get(key) == vid:
                del self.exact[key]
            self._unfold(vid, folded_key(key))

    def _unfold(self, vid: int, digest: bytes) -> None:
        """The entry ``vid`` (of folded key ``digest``) is gone: the key names the last entry
        added with it before that one (``ScopeIndex``), if one is left, else nothing."""
        older = self._older.get(digest)
        if self.folded.get(digest) == vid:
            if older:
                self.folded[digest] = older.popitem()[0]  # the last one added
            else:
                del self.folded[digest]
        elif older is not None:
            older.pop(vid, None)
        if older is not None and not older:
            del self._older[digest]

    def search(self, vector: Rows, k: int) -> list[tuple[int, float]]:
        """Up to ``k`` (id, inner product) pairs, best first."""
        self._adopt_rebuild()
        k = min(k, len(self.ids))
        if k <= 0:
            return []
        row = np.ascontiguousarray(vector.reshape(1, self._dim), dtype=np.float32)
        scores, ids = self._index.search(row, k)
        return [(i, s) for i, s in zip(ids[0].tolist(), scores[0].tolist(), strict=True) if i >= 0]

    @property
    def rebuilding(self) -> bool:
        """A rebuild of it runs, or is done and not swapped in yet."""
        return self._rebuild is not None

    def swap_if_built(self) -> bool:
        """Swaps in a rebuild that is done (a failed one is logged): True when none is left
        running. Done by its next add, removal or search anyway; the cache calls it as other
        scopes change, so an idle scope does not hold both indexes until its next one."""
        self._adopt_rebuild()
        return self._rebuild is None

    def wait_for_rebuild(self) -> None:
        """Blocks until a running rebuild is swapped in (tests and benchmarks)."""
        if self._rebuild is not None:
            self._rebuild.wait()
            self._adopt_rebuild()

    def _maybe_start_rebuild(self) -> None:
        ann = self._ann
        if ann is None or self._rebuild is not None or not ann.approximate(len(self.ids)):
            return
        if self._approximate and len(self.ids) < GROWTH * self._trained_for:
            return  # retrained (more lists) each time the scope has grown GROWTH times
        if len(self.ids) < GROWTH * self._failed_at:
            return  # the last try failed: not again on every add
        try:  # the copy (the scope's vectors again) and the worker thread may fail to start
            self._rebuild = Rebuild(list(self.slices()), ann)
        except Exception:  # as a failed build: the add that crossed is made, and stays so
            self._failed(len(self.ids))

    def _failed(self, size: int) -> None:
        """A rebuild from ``size`` rows failed (to start or to build): logged; the scope keeps
        serving from its current index and tries again at ``GROWTH`` times that size."""
        log.exception(
            "semantic-cache: the IVF rebuild of a scope of %d entries failed; it stays on "
            "its current index and tries again at %d entries",
            size,
            GROWTH * size,
        )
        self._failed_at = size

    def _adopt_rebuild(self) -> None:
        rebuild = self._rebuild
        if rebuild is None or not rebuild.done():
            return
        self._rebuild = None
        try:
            index = rebuild.adopt()
        except Exception:  # the build failed: the scope keeps serving from its current index
            self._failed(rebuild.size)
            return
        self._index, self._approximate = index, True
        self._trained_for = rebuild.size


def folded_key(key: str) -> bytes:
    """The sha256 of the folded text (``query.folded``): a digest, not a second copy of each
    question (up to 16 kB)."""
    return hashlib.sha256(folded(key).encode("utf-8", "surrogatepass")).digest()
