"""The billing outbox journal's thread: runs a ``Journal``'s calls on one worker thread, in
order, batching the writes queued meanwhile under one ``sync`` (``JournalThread``), and says a
journal whose writes fail or cannot be made durable (``FAILING_LOG_S``)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from services.router.outbox_journal import (
    REWRITE_RETRY_MAX_S,
    REWRITE_RETRY_S,
    Journal,
    JournalError,
)

log = logging.getLogger("cachemesh.router.outbox")

FAILING_LOG_S = 60.0  # a journal whose writes cannot be made durable is said again this often

T = TypeVar("T")


@dataclass
class _Call:
    run: Callable[[], object]
    durable: bool
    done: asyncio.Future[Any]
    written: bool = False  # ``done`` is set once it has run, before its batch's sync


class JournalThread:
    """Runs a journal's calls on one worker thread, in the order they were made; the calls
    queued while a batch runs form the next batch, whose writes share one ``sync``.

    ``sync_within_s``: how long a write no caller waits to be durable for (an open call's
    line, a "done" line) may stay unfsynced. A batch of them is not fsynced; if no durable
    batch comes within that time, one fsync is made then for all of them, so a host crash
    loses at most that much of the running calls' lines (one fsync a delay at most, however
    many calls). 0: every batch is fsynced; None: only with the next durable batch. The
    delay runs from the oldest unfsynced write (``monotonic``): a batch that comes later than
    that is fsynced itself, so a queue that never empties (the timer waits for it to) does not
    put the fsync off.

    A sync that fails (a failed fsync stays so until a rewrite succeeds: ``Journal.sync``), a
    write that fails (a full disk), and a journal file found removed are each counted
    (``sync_failed``: the metric) and said at ERROR as the failure starts, then at most once
    every ``FAILING_LOG_S`` with how many failed since, and at INFO once a durable sync of a
    batch none of whose writes failed succeeds again: not once a sync (the delayed one comes
    each ``sync_within_s``). ``failing``: between the two."""

    def __init__(
        self,
        journal: Journal,
        sync_within_s: float | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        sync_failed: Callable[[int], None] | None = None,
    ) -> None:
        if sync_within_s is not None and not sync_within_s >= 0:
            raise ValueError(f"sync_within_s must be >= 0 or None, got {sync_within_s}")
        self.journal = journal
        self._sync_within_s = sync_within_s
        self._monotonic = monotonic
        self._unsynced_since: float | None = None  # the oldest write not fsynced (the thread's)
        self._sync_due: asyncio.TimerHandle | None = None
        self._queue: list[_Call] = []
        self._runner: asyncio.Task[None] | None = None
        self._sync_failed = sync_failed
        # the thread's: since when syncs fail (None: they do not), when that was last said,
        # and how many failed since
        self._failing_since: float | None = None
        self._failing_said_at = 0.0
        self._failed_syncs = 0
        self._lost_seen = 0  # the journal's ``lost`` count already reported

    @property
    def failing(self) -> bool:
        """The journal's last writes or sync failed, and no durable batch succeeded since
        (read from the loop: a flag the thread sets)."""
        return self._failing_since is not None

    def submit(
        self, run: Callable[[], T], *, durable: bool = False, written: bool = False
    ) -> asyncio.Future[T]:
        """Queues ``run``; the future is its result. ``durable``: set only once its batch is
        fsynced (else the sync's failure is raised); otherwise the durability of its writes is
        not waited for (a settled entry's "done" line: a replay bills an entry once anyway).
        ``written``: set as soon as it has run, before its batch's fsync: its line is in the
        file (the kernel's cache), so it survives this process being killed, not a host crash
        (an open call's line, which must be in before its call's WARM is sent)."""
        done: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.append(_Call(run, durable, done, written and not durable))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.ensure_future(self._run())
        return done

    async def call(self, run: Callable[[], T], *, durable: bool = False) -> T:
        """``submit``, awaited; a caller that leaves does not take back its write."""
        return await asyncio.shield(self.submit(run, durable=durable))

    async def _run(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                loop = asyncio.get_running_loop()
                outcomes = await asyncio.to_thread(self._batch, batch, loop)
            except asyncio.CancelledError:  # the loop is ending: nothing queued will run
                for call in [*batch, *self._queue]:
                    _fail(call, JournalError("the journal stopped (shutdown)", written=False))
                self._queue.clear()
                raise
            except Exception as exc:  # no thread to run on: this batch fails, the next tries
                log.error("billing outbox: journal batch not run: %r", exc)
                outcomes = [
                    (False, JournalError(f"journal call not run: {exc!r}", written=False))
                ] * len(batch)
            for call, (ok, value) in zip(batch, outcomes, strict=True):
                _resolve(call.done, ok, value)
        if self._sync_within_s and self._sync_due is None and self.journal.dirty:
            loop = asyncio.get_running_loop()
            self._sync_due = loop.call_later(self._sync_within_s, self._sync_now)

    def _sync_now(self) -> None:
        """The delayed fsync of the writes no caller waited for (a no-op batch, durable)."""
        self._sync_due = None
        synced = self.submit(_nothing, durable=True)
        synced.add_done_callback(_retrieved)  # a failure is said by the thread (``_failing``)

    def _batch(
        self, batch: list[_Call], loop: asyncio.AbstractEventLoop
    ) -> list[tuple[bool, object]]:
        outcomes: list[tuple[bool, object]] = []
        write_failed: OSError | None = None
        for call in batch:
            try:
                outcomes.append((True, call.run()))
            except OSError as exc:  # the disk's fault: nothing of this call was kept
                outcomes.append((False, JournalError(str(exc), written=False)))
                self._failing(exc)  # a write is the journal failing as a sync is
                write_failed = exc
            except Exception as exc:  # handed to its caller
                outcomes.append((False, exc))
            if call.written:
                loop.call_soon_threadsafe(_resolve, call.done, *outcomes[-1])
        try:
            # a batch of open calls and "done" lines only (every model call writes them) costs
            # no fsync: an fsync a batch made the journal a sixth of the router's CPU per miss
            durable = any(call.durable for call in batch) or self._sync_overdue()
            try:
                self.journal.sync(fsync=durable)
            finally:
                self._count_lost()
            if durable:
                self._unsynced_since = None
                if write_failed is None:
                    self._durable_again()
            elif self.journal.dirty and self._unsynced_since is None:
                self._unsynced_since = self._monotonic()
        except OSError as exc:
            self._failing(exc)
            # no write of this batch is known durable: the calls that needed it and ran fail
            # with a JournalError (what they wrote stays in the journal's pending entries)
            failure = exc if isinstance(exc, JournalError) else JournalError(str(exc), written=True)
            return [
                (False, failure) if call.durable and ok else (ok, value)
                for call, (ok, value) in zip(batch, outcomes, strict=True)
            ]
        return outcomes

    def _count_lost(self) -> None:
        """The journal file found removed since the last batch: counted (it said it)."""
        lost = self.journal.lost - self._lost_seen
        if lost:
            self._lost_seen = self.journal.lost
            if self._sync_failed is not None:
                self._sync_failed(lost)

    def _failing(self, exc: OSError) -> None:
        """A sync failed: counted, and said as the failure starts, then once a while."""
        if self._sync_failed is not None:
            self._sync_failed(1)
        now = self._monotonic()
        if self._failing_since is None:
            self._failing_since = self._failing_said_at = now
            self._failed_syncs = 0
            log.error(
                "billing outbox: the journal cannot write or make its writes durable (%s; "
                "free space on ROUTER_DATA_DIR's volume, or fix its disk): a bill that must be "
                "kept (prefix-cache down) is held in memory and its answer refused "
                "(UNAVAILABLE), and while prefix-cache is also unreachable requests that need "
                "a model call are refused before it; a failed fsync is put behind by rewriting "
                "the journal into a fresh file (tried again %.0f s later, then up to every "
                "%.0f s); said again every %.0f s while it lasts",
                exc,
                REWRITE_RETRY_S,
                REWRITE_RETRY_MAX_S,
                FAILING_LOG_S,
            )
            return
        self._failed_syncs += 1
        if now - self._failing_said_at >= FAILING_LOG_S:
            log.error(
                "billing outbox: the journal still cannot write or make its writes durable, "
                "for %.0f s: %d writes or syncs failed in the last %.0f s (%s)",
                now - self._failing_since,
                self._failed_syncs,
                now - self._failing_said_at,
                exc,
            )
            self._failing_said_at, self._failed_syncs = now, 0

    def _durable_again(self) -> None:
        if self._failing_since is not None:
            log.info(
                "billing outbox: the journal's writes are durable again, after %.0f s",
                self._monotonic() - self._failing_since,
            )
            self._failing_since = None

    def _sync_overdue(self) -> bool:
        """The oldest unfsynced write is ``sync_within_s`` old (0: at once; None: never)."""
        within = self._sync_within_s
        if within is None:
            return False
        since = self._unsynced_since
        return within == 0 or (since is not None and self._monotonic() - since >= within)


def _nothing() -> None:
    return None


def _retrieved(synced: asyncio.Future[None]) -> None:
    if not synced.cancelled() and (exc := synced.exception()) is not None:
        log.debug("billing outbox: the delayed fsync of the open calls' lines failed: %s", exc)


def _resolve(done: asyncio.Future[Any], ok: bool, value: object) -> None:
    if done.done():
        return
    if ok:
        done.set_result(value)
    else:
        done.set_exception(cast(BaseException, value))


def _fail(call: _Call, exc: BaseException) -> None:
    if not call.done.done():
        call.done.set_exception(exc)
