"""A scope's IVF rebuilt in the background (``ScopeIndex`` starts one as the scope grows).

``Rebuild`` builds a scope's new IVF in a worker thread from a copy of its rows, taken in
slices that the worker frees as it adds them (so the rebuild holds the scope's vectors about
twice, not three times). The changes made to the scope meanwhile are recorded in order; the
worker replays them on the new index itself, in batches (one FAISS call per run of adds), and
hands the index over only when the changes left hold fewer than ``CATCH_UP`` rows, so the
swap, which runs on the lookup path, replays a few rows instead of every store made during
the build. (A scope that keeps growing as fast as the worker replays keeps the old index
until it slows down; a live scope grows by one embedded store at a time.)
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.semantic_cache.ann import (
    AnnSettings,
    Ids,
    Rows,
    remove_ids,
    sample_positions,
    train_ivf,
)

CATCH_UP = 256  # the worker hands over once the changes left hold fewer rows than this


@dataclass(frozen=True)
class _Change:
    added: bool  # an add (else a removal)
    vids: Ids
    rows: Rows | None  # the added rows


class Rebuild:
    """A new IVF for a scope, built in a worker thread from ``slices``: copies of the scope's
    rows as ``(ids, rows)``, which the worker drops from the list as it adds them."""

    def __init__(self, slices: list[tuple[Ids, Rows]], ann: AnnSettings) -> None:
        self.size = sum(len(ids) for ids, _ in slices)  # rows it is built from
        self._lock = threading.Lock()
        self._changes: list[_Change] = []
        self._replayed = 0  # changes the worker has applied
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scope-index-rebuild")
        self._future: Future[Any] = pool.submit(self._build, slices, ann)
        pool.shutdown(wait=False)

    def added(self, vids: Ids, rows: Rows) -> None:
        """Records rows added to the scope (``rows`` must not change afterwards)."""
        with self._lock:
            self._changes.append(_Change(True, vids, rows))

    def removed(self, vids: Ids) -> None:
        """Records rows removed from the scope."""
        with self._lock:
            self._changes.append(_Change(False, vids, None))

    def done(self) -> bool:
        return self._future.done()

    def wait(self) -> None:
        self._future.exception()  # raised by ``adopt``

    def adopt(self) -> Any:
        """The new index with every recorded change applied (once ``done``; a failed build
        raises here, never hidden). Called by the thread that records the changes."""
        index = self._future.result()
        _apply(index, self._changes[self._replayed :])
        self._changes, self._replayed = [], 0
        return index

    def _build(self, slices: list[tuple[Ids, Rows]], ann: AnnSettings) -> Any:
        nlist = ann.nlist(self.size)
        index = train_ivf(_gather(slices, sample_positions(self.size, nlist)), nlist, ann)
        while slices:
            ids, rows = slices.pop(0)
            index.add_with_ids(rows, ids)
            del ids, rows  # this slice's copy is freed now
        while True:
            with self._lock:
                pending = self._changes[self._replayed :]
                if sum(len(change.vids) for change in pending) < CATCH_UP:
                    return index  # the few left are applied by ``adopt``
            _apply(index, pending)
            with self._lock:
                self._replayed += len(pending)


def _gather(slices: list[tuple[Ids, Rows]], positions: Ids) -> Rows:
    """Rows at ``positions`` of the slices laid end to end, in the order of ``positions``."""
    starts = np.cumsum([0] + [len(ids) for ids, _ in slices])
    which = np.searchsorted(starts, positions, side="right") - 1
    dim = slices[0][1].shape[1]
    out = np.empty((len(positions), dim), dtype=np.float32)
    for part in np.unique(which):
        chosen = which == part
        out[chosen] = slices[part][1][positions[chosen] - starts[part]]
    return out


def _apply(index: Any, changes: list[_Change]) -> None:
    """Applies changes in order, each run of adds (or removals) in one FAISS call."""
    start = 0
    while start < len(changes):
        end = start + 1
        while end < len(changes) and changes[end].added == changes[start].added:
            end += 1
        run = changes[start:end]
        vids = np.concatenate([c.vids for c in run])
        if run[0].added:
            index.add_with_ids(np.concatenate([c.rows for c in run if c.rows is not None]), vids)
        else:
            remove_ids(index, True, vids)
        start = end
