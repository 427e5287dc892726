"""When the semantic cache is saved: loaded in the warm-up, saved periodically and at stop.

The copy of the cache is taken synchronously on the event loop (so it is consistent) and
written in a worker thread. Saves never overlap, and ``stop`` lets a save in progress finish
before the final one, so the newest copy is always the one left on disk.

With a write-ahead log, the warm-up restores the snapshot and then replays the log records it
does not contain, streamed from the log in a worker thread as the restore is; a replay of more
than ``snapshot_after_replay`` records is saved as a snapshot at once (the next crash does not
replay them again). Every change after that is logged and synced before it is acknowledged.
Each save rotates the log together with the copy and then deletes the segments the new
snapshot covers, so a crash at any point leaves a snapshot plus the records after it.

A stop during the warm-up (a SIGTERM mid-replay) cancels it, but not a worker thread: the
replay checks between records, and before it opens the log or saves, whether the stop came,
and stops there (the directory as the crash left it: the next start replays the records);
``stop`` and ``join`` return only once the thread has ended, so the data directory's lock is
never released while a thread of this process still changes the directory.

A save that fails (a full disk, an I/O error, the log's directory gone) is retried by the
next period or the next drop; each failure is counted (``on_failure``: the metric) and said
in one ERROR line with its reason, at most once every ``FAILURE_LOG_INTERVAL_S`` seconds (a
new reason at once), with how many failed in a row; the first save after them says so. Until
a save succeeds the snapshot file and the log keep what was dropped since the last one.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from services.common.clock import Clock, SecondsClock, Throttle
from services.common.files import os_error_text
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.journal import WalJournal, replay
from services.semantic_cache.persistence import SnapshotError, SnapshotStore
from services.semantic_cache.records import UNSTAMPED_SCOPE, CacheContents, RestoreReport
from services.semantic_cache.wal import WriteAheadLog

log = logging.getLogger("cachemesh.semantic_cache.persistence")
# A replay of more records than this saves a snapshot before serving: with a long period, or
# SEMANTIC_CACHE_SNAPSHOT_S=0, the log grows between clean stops, and every crash would replay
# it all again (100k records from the log took 10 s and 1.3 GB before they were streamed).
SNAPSHOT_AFTER_REPLAY = 10_000
# A drop (an operator's purge) is followed by a snapshot this long after it, one for every drop
# within that time: the snapshot rewrites the file and deletes the log segments, so the purged
# questions and answers leave the disk within seconds, not at the next period (60 s; never with
# SEMANTIC_CACHE_SNAPSHOT_S=0 until a clean stop). A purge script dropping every tenant's L1
# costs one save per this many seconds, not one per tenant.
SAVE_AFTER_DROP_S = 5.0
# A failing save is said at most once this often (the first at once, a new reason at once):
# with the default period every minute's retry would log a line, a traceback before.
FAILURE_LOG_INTERVAL_S = 600.0
T = TypeVar("T")


class ReplayStopped(RuntimeError):
    """The stop came while the snapshot was restored or the log replayed: the replay ended
    at a record boundary, the log was not opened for appends and nothing was saved."""


class Snapshotter:
    """Keeps one cache's snapshot in a ``SnapshotStore``; ``period_s`` 0 = only at stop."""

    def __init__(
        self,
        store: SnapshotStore,
        clock: Clock,
        period_s: float,
        wal: WriteAheadLog | None = None,
        on_save: Callable[[float], None] | None = None,
        timer: Callable[[], float] = time.perf_counter,
        snapshot_after_replay: int = SNAPSHOT_AFTER_REPLAY,
        on_tail_cut: Callable[[str], None] | None = None,
        save_after_drop_s: float = SAVE_AFTER_DROP_S,
        on_failure: Callable[[], None] | None = None,
        on_log_loss: Callable[[int], None] | None = None,
    ) -> None:
        """``on_save(seconds)`` hears of each snapshot written, ``on_failure()`` of each save
        that failed, ``on_tail_cut(kind)`` of a bad end cut off the log at start, ``torn`` or
        ``damaged``, ``on_log_loss(records)`` of records missing before the log's first
        segment with no snapshot to hold them, found at start (the metrics); a replay of
        more than ``snapshot_after_replay`` log records is saved as a snapshot before
        serving; ``dropped`` saves one ``save_after_drop_s`` seconds later. ``timer``
        (monotonic seconds) times the saves and paces the failure lines."""
        if period_s < 0:
            raise ValueError(f"period_s must be >= 0, got {period_s}")
        if save_after_drop_s < 0:
            raise ValueError(f"save_after_drop_s must be >= 0, got {save_after_drop_s}")
        self._save_after_drop_s = save_after_drop_s
        self._after_drop: asyncio.Task[None] | None = None  # the save a drop asked for
        self._store = store
        self._wal = wal
        self._on_save = on_save
        self._timer = timer
        self._clock = clock
        self._period_s = period_s
        self._snapshot_after_replay = snapshot_after_replay
        self._on_tail_cut = on_tail_cut
        self._on_failure = on_failure
        self._on_log_loss = on_log_loss
        self._failure_log = self._new_failure_log()
        self._failed_reason: str | None = None  # the last failure said, until a save succeeds
        self._failures = 0  # saves failed in a row
        self._cache: SemanticCache | None = None
        self._saved_changes: int | None = None  # the cache's ``changes`` at the last save
        self._lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # set by a stop (or the warm-up cancelled): the restore or replay thread ends early
        self._abandon = threading.Event()
        self._working: asyncio.Future[Any] | None = None  # the restore's or replay's thread

    async def open(self, cache: SemanticCache) -> RestoreReport | None:
        """Restores the snapshot (if any) into ``cache``, replays the log records after it,
        then starts the periodic saves.

        The restore and the replay (with the snapshot a long one is saved as) run in a worker
        thread: nothing else uses the cache, or appends to the log, yet, and the event loop
        keeps answering health checks (NOT_SERVING) meanwhile.
        """
        report, wal_seq, found, unstamped = await self._in_thread(self._restore, cache)
        if self._wal is not None:
            saved_s = await self._in_thread(self._replay, cache, wal_seq, found, unstamped)
            if isinstance(saved_s, Exception):  # the log still holds them: the next save
                self._failed("after the replay", saved_s)
            elif saved_s is not None and self._on_save is not None:
                self._on_save(saved_s)
            cut = self._wal.tail_cut
            if cut is not None and self._on_tail_cut is not None:
                self._on_tail_cut(cut.kind)
            if self._wal.lost_at_start and self._on_log_loss is not None:
                self._on_log_loss(self._wal.lost_at_start)
            cache.attach_journal(WalJournal(self._wal))
        if old := cache.stats.old_scope:
            log.info(
                "%d of the %d entries restored are of an older scope version than this "
                "build's (%s): no lookup names their scope, so they are never served; they "
                "leave at their TTL, or first when L1 is full (metric "
                "cachemesh_semantic_cache_old_scope_entries)",
                old,
                sum(cache.stats.entries.values()),
                cache.stats.scope_version,
            )
        self._cache = cache
        if self._period_s > 0:
            self._task = asyncio.create_task(self._periodic(), name="semantic-cache-snapshots")
        return report

    async def _in_thread(self, work: Callable[..., T], *args: object) -> T:
        """``work(*args)`` in a worker thread that ``join`` waits for: cancelling the caller
        (a stop during the warm-up) tells the thread to stop, and leaves it to end."""
        running = asyncio.ensure_future(asyncio.to_thread(work, *args))
        self._working = running
        try:
            result: T = await asyncio.shield(running)
        except asyncio.CancelledError:
            self._abandon.set()
            raise
        return result

    def _unless_stopped(self, records: Iterable[T]) -> Iterator[T]:
        for record in records:
            self._check_stopped()
            yield record

    def _check_stopped(self) -> None:
        if self._abandon.is_set():
            raise ReplayStopped("stopped during the replay of the write-ahead log")

    def _replay(
        self, cache: SemanticCache, wal_seq: int, snapshot: bool, unstamped: str
    ) -> float | Exception | None:
        """Applies the log records after ``wal_seq`` (``snapshot``: the last one a snapshot
        restored holds; else none was there), a record at a time, and opens the log
        for appends; more than ``snapshot_after_replay`` of them are saved as a snapshot at
        once: how long that save took (None: none was; the exception: it failed, said on the
        loop). ``ReplayStopped`` between records once the stop came (nothing opened or
        saved)."""
        assert self._wal is not None
        cache.use_faiss_threads()
        records = self._unless_stopped(self._wal.records(wal_seq, snapshot=snapshot))
        applied = replay(cache, records, wal_seq, cache.dim, self._wal, unstamped)
        self._check_stopped()
        self._wal.start()
        if not applied:
            return None
        self._saved_changes = None
        cut, note = self._wal.tail_cut, ""
        if cut is not None and cut.moved_to is not None:
            note = f"; a damaged last record moved to {cut.moved_to}"
        elif cut is not None:
            note = f"; a torn last record cut off ({cut.size} bytes)"
        log.info("replayed %d write-ahead-log records after the snapshot%s", applied, note)
        if applied <= self._snapshot_after_replay:
            return None
        began, last = self._timer(), self._wal.last_seq  # nothing appended since the replay
        contents = cache.export_entries()
        self._check_stopped()
        try:
            size = self._store.save(contents, self._clock.now_ms(), last)
        except Exception as exc:  # the log still holds them: serve, and the next save retries
            return exc
        self._wal.drop_through(last)
        self._saved_changes = cache.changes
        log.info(
            "saved %d entries (%d bytes) to %s after the replay",
            len(contents.entries),
            size,
            self._store.path,
        )
        return self._timer() - began

    def _restore(self, cache: SemanticCache) -> tuple[RestoreReport | None, int, bool, str]:
        """The restore's report, the last log record the snapshot holds (0 = none), whether
        there was a snapshot, and the scope version of an unstamped entry in the log after it
        (v1 after a snapshot of a format before 4: the log was its build's, or stamped)."""
        snapshot = self._store.open()
        if snapshot is None:
            log.info("no snapshot at %s: starting empty", self._store.path)
            return None, 0, False, UNSTAMPED_SCOPE
        with snapshot:
            try:
                report = cache.restore(snapshot)
            except ValueError as exc:
                raise SnapshotError(self._store.path, f"cannot be restored: {exc}") from exc
        log.info(
            "restored %d entries from %s (skipped %d expired; evicted %d over capacity)",
            report.restored,
            self._store.path,
            report.expired,
            report.evicted,
        )
        if report.other_embedder:
            log.warning(
                "skipped %d entries of embedder %s (this one is %s): they are dropped",
                report.other_embedder,
                snapshot.embedder_version,
                cache.embedder_version,
            )
        if report.restored == snapshot.count:
            self._saved_changes = cache.changes  # the file already says exactly this
        return report, snapshot.wal_seq, True, snapshot.unstamped

    async def save(self) -> bool:
        """Saves the cache now unless nothing changed since the last save (and the log did
        not fail since: only a snapshot lets it take changes again); True if written."""
        async with self._lock:
            cache = self._cache
            failed = self._wal is not None and self._wal.failed
            if cache is not None:
                # expired entries are a change: else a quiet cache (no lookup or store to
                # collect them) kept their questions and answers in the snapshot, and the
                # log, until traffic came (1 of 1 after its TTL, and after a clean stop)
                cache.collect_expired()
            if cache is None or (cache.changes == self._saved_changes and not failed):
                return False

            def copy() -> tuple[CacheContents, int]:  # synchronous: a consistent copy
                contents = cache.export_entries()
                return contents, cache.changes

            began = self._timer()
            wal_seq = 0
            if self._wal is None:
                contents, changes = copy()
            else:
                (contents, changes), wal_seq = await self._wal.rotate(copy)
            size = await asyncio.to_thread(
                self._store.save, contents, self._clock.now_ms(), wal_seq
            )
            if self._wal is not None:
                self._wal.superseded(wal_seq)
                await asyncio.to_thread(self._wal.drop_through, wal_seq)
            self._saved_changes = changes
            self._saved_again()
            if self._on_save is not None:
                self._on_save(self._timer() - began)
            log.info(
                "saved %d entries (%d bytes) to %s", len(contents.entries), size, self._store.path
            )
            return True

    def dropped(self) -> None:
        """Entries were dropped (an Invalidate): a snapshot follows ``save_after_drop_s``
        seconds later, so their text leaves the snapshot and the log, which hold it until the
        next save. The drops until then share it; one during it asks for another."""
        if self._cache is None or self._stopping.is_set() or self._after_drop is not None:
            return
        self._after_drop = asyncio.create_task(
            self._save_after_drop(), name="semantic-cache-snapshot-after-drop"
        )

    async def _save_after_drop(self) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=self._save_after_drop_s)
            return  # stopping: the last save covers the drop
        except TimeoutError:
            pass
        self._after_drop = None  # a drop from now on is not in this copy: it asks again
        try:
            await self.save()
        except Exception as exc:  # a full disk: the next period, or the next drop, tries again
            self._failed("after a drop", exc)

    async def settled(self) -> None:
        """Waits for the save a drop asked for, if one is waiting (tests, and ``stop``)."""
        while (pending := self._after_drop) is not None:
            await pending
            if self._after_drop is pending:
                self._after_drop = None

    async def join(self) -> None:
        """Stops a restore or replay still running in its worker thread (the warm-up was
        cancelled) at its next record and waits for the thread to end: the data directory's
        lock must outlive every thread that may change the directory."""
        self._abandon.set()
        running = self._working
        if running is None:
            return
        await asyncio.wait({running})  # never raises: the outcome is the warm-up's
        # retrieved here: a failed warm-up is reported by the warm-up, not by this stop
        if not running.cancelled() and isinstance(running.exception(), ReplayStopped):
            log.info(
                "stopped during the replay of the write-ahead log: nothing was changed in "
                "%s, the next start replays its records",
                self._store.directory,
            )

    async def stop(self) -> None:
        """Ends the periodic saves (a save in progress finishes), then saves a last time;
        during the warm-up, stops its restore or replay and waits for its thread (``join``)."""
        self._stopping.set()
        await self.join()
        if self._task is not None:
            await self._task
        await self.settled()  # wakes at the stop and saves nothing: the last save follows
        if self._cache is None:
            if self._wal is not None:
                self._wal.close()  # opened by a replay whose warm-up was cancelled after it
        else:
            try:
                await self.save()
            except Exception as exc:
                self._failed("at the stop", exc, last=True)
                raise
            finally:
                if self._wal is not None:
                    self._wal.close()

    async def _periodic(self) -> None:
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=self._period_s)
            except TimeoutError:
                try:
                    await self.save()
                except Exception as exc:  # a full disk must not stop the service: next period
                    self._failed("periodic", exc)

    def _failed(self, when: str, exc: Exception, *, last: bool = False) -> None:
        """A save failed: counted, and said with its reason at most once an interval (a new
        reason, or the ``last`` save, at once); a traceback only for what is not an OSError
        (a bug, not the disk)."""
        self._failures += 1
        if self._on_failure is not None:
            self._on_failure()
        reason = _reason(exc)
        if not self._failure_log.due(force=last or reason != self._failed_reason):
            return
        self._failed_reason = reason
        log.error(
            "a snapshot (%s) to %s failed (%s; %d in a row): the write-ahead log keeps the "
            "changes, and the entries dropped since the last saved snapshot are still in the "
            "snapshot file and the log until one is saved; retried each period and after each "
            "drop (check the disk of SEMANTIC_CACHE_DATA_DIR: full, or failing?)",
            when,
            self._store.path,
            reason,
            self._failures,
            exc_info=None if isinstance(exc, OSError) else exc,
        )

    def _saved_again(self) -> None:
        """A save succeeded: after failures, says so, and the next failure is said at once."""
        if not self._failures:
            return
        log.info("a snapshot to %s saved again after %d failed", self._store.path, self._failures)
        self._failures = 0
        self._failed_reason = None
        self._failure_log = self._new_failure_log()

    def _new_failure_log(self) -> Throttle:
        return Throttle(SecondsClock(self._timer), round(FAILURE_LOG_INTERVAL_S * 1000))


def _reason(exc: Exception) -> str:
    """What failed, for the log: an OSError's errno name and text (and file), else the
    exception's type and message."""
    if isinstance(exc, OSError):
        return os_error_text(exc) + (f": {exc.filename}" if exc.filename else "")
    return f"{type(exc).__name__}: {exc}"
