"""The billing outbox's pending entries: in memory without a data directory (``MemoryEntries``:
lost with the router, bounded by ``ROUTER_OUTBOX_MAX_BYTES``), or in the journal
(``DiskEntries``), with the bills a full disk could not write held in memory until prefix-cache
or the journal takes them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from functools import partial
from typing import NamedTuple

from cachemesh.v1 import prefix_cache_pb2 as pc
from services.router.outbox_journal import Counted, Journal, JournalEntry, JournalError
from services.router.outbox_journal_thread import JournalThread

log = logging.getLogger("cachemesh.router.outbox")

# an entry: its commits and the trace carrier of the request they bill
Entry = tuple[tuple[pc.CommitRequest, ...], dict[str, str]]


class ReadEntry(NamedTuple):
    """An entry read back to replay it."""

    entry: JournalEntry
    open_call: bool  # it bills a model call of an earlier process (killed), not an answer


UNREADABLE = ReadEntry(JournalEntry((), {}, None, None), False)  # dropped: nothing to replay


class MemoryEntries:
    """The pending entries without a data directory: lost with the router."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}
        self._estimates: dict[str, Counted] = {}  # each entry's estimated cost and its time
        self.held_bytes = 0  # the commits held, serialized: what the bound counts

    @property
    def count(self) -> int:
        return len(self._entries)

    async def add(
        self,
        entry_id: str,
        commits: tuple[pc.CommitRequest, ...],
        carrier: dict[str, str],
        counted: Counted,
        written: Callable[[], None],
    ) -> None:
        self.put(entry_id, commits, carrier, counted)
        written()

    def put(
        self,
        entry_id: str,
        commits: tuple[pc.CommitRequest, ...],
        carrier: dict[str, str],
        counted: Counted,
    ) -> None:
        if (before := self._entries.get(entry_id)) is not None:
            self.held_bytes -= _size(before[0])
        self._entries[entry_id] = (commits, carrier)
        self._estimates[entry_id] = counted
        self.held_bytes += _size(commits)

    def holds(self, entry_id: str) -> bool:
        return entry_id in self._entries

    def entry(self, entry_id: str) -> tuple[tuple[pc.CommitRequest, ...], dict[str, str], Counted]:
        commits, carrier = self._entries[entry_id]
        return commits, carrier, self._estimates[entry_id]

    def held(self) -> list[tuple[tuple[pc.CommitRequest, ...], int]]:
        """Each pending entry's commits and estimated cost."""
        return [
            (commits, self._estimates[key].estimate_nanos)
            for key, (commits, _) in self._entries.items()
        ]

    async def ids(self) -> list[str]:
        return list(self._entries)

    def ids_now(self) -> list[str]:
        return list(self._entries)

    async def read(self, entry_id: str) -> ReadEntry:
        commits, carrier = self._entries[entry_id]
        return ReadEntry(JournalEntry(commits, carrier, None, self._estimates[entry_id]), False)

    def done(self, entry_id: str) -> asyncio.Future[None]:
        if (entry := self._entries.pop(entry_id, None)) is not None:
            self.held_bytes -= _size(entry[0])
            del self._estimates[entry_id]
        settled: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        settled.set_result(None)
        return settled


class DiskEntries:
    """The pending entries in the journal, the one record of them, run on its thread; and
    the bills it could not write (a full disk), ``held`` in memory until prefix-cache takes
    them or a replay round writes them into the journal (``retry_held``)."""

    def __init__(
        self,
        journal: Journal,
        sync_within_s: float | None,
        sync_failed: Callable[[int], None] | None = None,
    ) -> None:
        self._thread = JournalThread(journal, sync_within_s, sync_failed=sync_failed)
        self._journal = journal
        # an entry held here may also be in the journal as its call's open call (the same
        # id): it is one entry, replayed from here
        self.held = MemoryEntries()

    @property
    def count(self) -> int:
        held = sum(1 for entry_id in self.held.ids_now() if not self._journal.holds(entry_id))
        return self._journal.pending_count + held

    def holds(self, entry_id: str) -> bool:
        """The entry is in the journal or held in memory (safe on the loop: ``Journal.holds``
        is a read of the pending ids)."""
        return self._journal.holds(entry_id) or self.held.holds(entry_id)

    @property
    def failing(self) -> bool:
        """The journal's writes or syncs fail (a full or failing disk), not yet back."""
        return self._thread.failing

    def _hold_if_unwritten(
        self,
        entry_id: str,
        entry: tuple[tuple[pc.CommitRequest, ...], dict[str, str], Counted],
        written: Callable[[], None],
        added: asyncio.Future[None],
    ) -> None:
        """An entry whose line could not be written is held in memory (not dropped), its
        estimate counted as a written line's is: whether or not its caller still waits."""
        if added.cancelled():
            return
        exc = added.exception()
        if isinstance(exc, JournalError) and not exc.written:
            self.held.put(entry_id, *entry)
            written()

    async def retry_held(self) -> None:
        """While the journal fails: the bills held in memory written into it, oldest first
        (a write that fails stops the round: the disk is still full); with none held, a
        durable no-op (a failed fsync's rewrite tried, per its delay). Either succeeding is
        what tells the journal is back (``failing``)."""
        if not self.held.count:
            if self._thread.failing:
                with contextlib.suppress(JournalError):
                    await self._thread.call(_nothing_to_write, durable=True)
            return
        moved = 0
        for entry_id in self.held.ids_now():
            commits, carrier, counted = self.held.entry(entry_id)
            add = partial(self._journal.add, entry_id, commits, carrier, counted=counted)
            try:
                await self._thread.call(add, durable=True)
            except JournalError as exc:
                if exc.written:  # in the journal, not durable: the journal bills it
                    self.held.done(entry_id)
                break
            self.held.done(entry_id)
            moved += 1
        if moved:
            log.info("billing outbox: %d bills held in memory are in the journal now", moved)

    async def add(
        self,
        entry_id: str,
        commits: tuple[pc.CommitRequest, ...],
        carrier: dict[str, str],
        counted: Counted,
        written: Callable[[], None],
    ) -> None:
        """``written`` is called on the loop once the line is in the file (before its fsync,
        and whether or not this call is still awaited then)."""
        loop = asyncio.get_running_loop()

        def add() -> None:
            self._journal.add(entry_id, commits, carrier, counted=counted)
            with contextlib.suppress(RuntimeError):  # the loop closed: the process ends
                loop.call_soon_threadsafe(written)

        added = self._thread.submit(add, durable=True)
        entry = (commits, carrier, counted)
        added.add_done_callback(partial(self._hold_if_unwritten, entry_id, entry, written))
        try:
            await asyncio.shield(added)
        except JournalError as exc:
            if exc.written:
                raise
            raise JournalError(
                f"{exc}: the bill is held in memory until prefix-cache or the journal takes "
                "it (lost if the router stops first)",
                written=True,  # billed if the router lives, as a written line not fsynced
            ) from exc

    async def ids(self) -> list[str]:
        journalled = await self._thread.call(self._journal.pending)
        known = set(journalled)
        held = (entry_id for entry_id in self.held.ids_now() if entry_id not in known)
        return [*journalled, *held]

    async def read(self, entry_id: str) -> ReadEntry:
        if self.held.holds(entry_id):
            return await self.held.read(entry_id)

        def read() -> ReadEntry:
            return ReadEntry(self._journal.read_traced(entry_id), self._journal.is_open(entry_id))

        return await self._thread.call(read)

    def open(
        self,
        entry_id: str,
        commits: tuple[pc.CommitRequest, ...],
        carrier: dict[str, str],
        started_ms: int,
        durable: bool = False,
    ) -> asyncio.Future[None]:
        """Written with the next batch (fsynced with it); the future is set once written, or
        (``durable``) once fsynced, when it fails with the sync."""
        added = partial(
            self._journal.add, entry_id, commits, carrier, open_call=True, started_ms=started_ms
        )
        return self._thread.submit(added, durable=durable, written=not durable)

    def done(self, entry_id: str) -> asyncio.Future[None]:
        """Its line need not be durable (a replay bills once): not awaited one by one. An
        entry held in memory is done there, and in the journal too (its call's open call)."""
        self.held.done(entry_id)
        return self._thread.submit(partial(self._journal.done, entry_id))


def _nothing_to_write() -> None:
    return None


def _size(commits: Sequence[pc.CommitRequest]) -> int:
    return sum(commit.ByteSize() for commit in commits)
