"""One scope's vectors: a FAISS inner-product index over L2-normalised rows (= cosine)."""

from __future__ import annotations

import faiss
import numpy as np
import numpy.typing as npt


class ScopeIndex:
    """The entries of one (tenant, scope): FAISS ids, vectors and the exact-match keys."""

    def __init__(self, dim: int, namespace: str) -> None:
        self.namespace = namespace
        self.exact: dict[str, int] = {}  # normalised query -> id
        self.ids: set[int] = set()
        self._dim = dim
        self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, vid: int, vector: npt.NDArray[np.float32], key: str) -> None:
        row = np.ascontiguousarray(vector.reshape(1, self._dim), dtype=np.float32)
        self._index.add_with_ids(row, np.array([vid], dtype=np.int64))
        self.ids.add(vid)
        self.exact[key] = vid

    def add_many(self, vids: list[int], vectors: npt.NDArray[np.float32], keys: list[str]) -> None:
        """Adds rows in bulk (a restore); ``keys[i]`` is the exact-match key of ``vids[i]``."""
        rows = np.ascontiguousarray(vectors.reshape(len(vids), self._dim), dtype=np.float32)
        self._index.add_with_ids(rows, np.array(vids, dtype=np.int64))
        self.ids.update(vids)
        self.exact.update(zip(keys, vids, strict=True))

    def export(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """A copy of (ids, vectors): row i of the vectors is the one of ids[i]."""
        ids: npt.NDArray[np.int64] = faiss.vector_to_array(self._index.id_map).astype(np.int64)
        total = int(self._index.ntotal)
        vectors = np.asarray(self._index.index.reconstruct_n(0, total), dtype=np.float32)
        return ids, vectors.reshape(total, self._dim)

    def remove(self, vid: int, key: str) -> None:
        self._index.remove_ids(faiss.IDSelectorBatch(np.array([vid], dtype=np.int64)))
        self.ids.discard(vid)
        if self.exact.get(key) == vid:
            del self.exact[key]

    def search(self, vector: npt.NDArray[np.float32], k: int) -> list[tuple[int, float]]:
        """Up to ``k`` (id, inner product) pairs, best first."""
        k = min(k, len(self.ids))
        if k <= 0:
            return []
        row = np.ascontiguousarray(vector.reshape(1, self._dim), dtype=np.float32)
        scores, ids = self._index.search(row, k)
        return [(int(i), float(s)) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0]
