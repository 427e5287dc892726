"""The write-ahead log: every acknowledged change, durable before Store or Drop returns.

Records are appended to segment files ``<data dir>/wal/<first seq, 20 digits>.log``, each
framed as 4 bytes of length (big-endian), 4 bytes of CRC-32 and a JSON body carrying its
sequence number. Appends are buffered in memory on the event loop, in the order of the
changes; ``sync`` writes them and makes everything appended so far durable (one fsync in a
thread covers every waiting writer: a group commit) and callers acknowledge only after it
returns. A change is applied (made visible) once its record is durable, not before: each
append may carry its ``apply``, run in the log's order by the sync (or the rotation) that
made it durable, never when its record is lost.

A failed write or fsync (a full disk, an I/O error) loses every record not yet durable: their
changes are never applied, their bytes are cut off the segment (so a crash cannot replay
them), and the log refuses every append and sync (``NotDurable``) until a snapshot taken
after the failure is saved (``superseded``): the kernel may have dropped pages a later fsync
would not report, and the snapshot, taken from memory, holds exactly the applied changes.

A snapshot records the last sequence number it contains and the log is rotated when it is
taken; segments entirely covered by a saved snapshot are deleted. On start the log is read in
order, a record at a time (``records``: a segment the snapshot covers whole is not read): a torn
record at the very end of the last segment (its length runs past the end of the file, or it is
zero-filled from some point to the end of the file, as a power loss may leave a file whose size
grew before its data landed: a crash during an append that was never acknowledged) is cut off
with a warning; a whole last record whose bytes fail its checksum is damage, not a crash, and
may have been acknowledged: it is moved aside to ``<segment>.damaged`` with an error
(``tail_cut`` says which). No record is ever written empty: a length of 0 is never read as one.
Any other damage is an error naming the file, never skipped.
The log read after a snapshot must begin where the snapshot ends: a first segment named after
a later record (``LogGap``) means records are in neither file (a snapshot restored from a
backup taken file by file, older than the log beside it): replayed over that snapshot, the log
would bring back what those records dropped or replaced, so it is an error. A snapshot newer
than the log (the log copied first) is not: every record of that log is in it, none is
replayed, and new records are numbered after the snapshot's. With no snapshot
at all (removed, say after it was reported damaged) nothing old can come back: the records
that remain are replayed and the loss is said in one error line.
``append`` refuses a record over ``_MAX_RECORD``; reading takes a record of any length whose
bytes and CRC are whole (a log written before appends were bounded may hold a larger one,
acknowledged): it is replayed, never taken for damage or a torn tail.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import errno
import io
import itertools
import json
import logging
import os
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from services.common.background import to_the_end
from services.common.files import fsync_directory, os_error_text
from services.common.private_files import open_private, private_directory

log = logging.getLogger("cachemesh.semantic_cache.persistence")
_FRAME = struct.Struct(">II")  # length, crc32
_MAX_RECORD = 64 << 20  # the largest record appended (the cache stores smaller: cache.py)
_SUFFIX = ".log"
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class TailCut:
    """What reading the log cut off the end of its last segment: a ``torn`` record (its length
    runs past the end of the file, or it is zeros to the end of the file: a crash mid-append,
    never acknowledged) or a ``damaged`` one (whole, its checksum or body wrong: damage, and
    it may have been acknowledged; the bytes from it on are kept in ``moved_to``)."""

    kind: str
    segment: Path
    offset: int
    size: int  # bytes cut
    moved_to: Path | None


class WalError(RuntimeError):
    """The log is damaged somewhere other than its torn tail; the message names the file."""


class LogGap(WalError):
    """The log read after a snapshot begins after the record following it: the records in
    between are in neither (the snapshot is older than the log, or was removed)."""

    def __init__(self, segment: Path, after_seq: int) -> None:
        first = int(segment.stem)
        super().__init__(
            f"{segment}: the write-ahead log begins at record {first}, but the snapshot beside "
            f"it holds the records up to {after_seq} only: "
            f"{_numbers(after_seq + 1, first - 1, 'is', 'are')} in neither (the snapshot is "
            "older than the log: restored from a backup taken file by file, or replaced; or "
            "the log's directory was removed while semantic-cache ran, which its ERROR line "
            "said). Replayed over it, the log would bring back the answers and tenants those "
            "records replaced or dropped. Put back the snapshot saved with this log if there "
            f"is one, or move both the snapshot and {segment.parent} aside to start empty"
        )
        self.segment = segment
        self.after_seq = after_seq


class NotDurable(WalError):
    """A write or fsync of the log failed (disk full, I/O error): the change is not durable,
    so not applied, and none is until a snapshot is saved. ``reason`` says it without the
    path, for a caller; the message names the directory, for the log."""

    def __init__(self, directory: Path, cause: str) -> None:
        super().__init__(
            f"{directory}: a write or fsync of the write-ahead log failed ({cause}); no change "
            "is applied until a snapshot is saved (check the disk: full, or failing?)"
        )
        self.reason = (
            f"semantic-cache cannot write its write-ahead log on the disk of "
            f"SEMANTIC_CACHE_DATA_DIR ({cause}): the change is not applied, nor any other "
            "until space is freed there and the next snapshot is saved "
            "(SEMANTIC_CACHE_SNAPSHOT_S); retry later"
        )


class WriteAheadLog:
    def __init__(
        self,
        directory: Path,
        on_fsync: Callable[[float], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        """``on_fsync(seconds)`` hears of each group commit's fsync (the metrics)."""
        self.directory = directory
        self._on_fsync = on_fsync
        self._clock = clock
        self._out: io.RawIOBase | None = None  # the open segment, unbuffered
        self._buffer = bytearray()  # records appended, not yet written
        self._size = 0  # bytes written to the open segment
        self._durable_size = 0  # of which made durable
        self._next_seq = 1
        self._written = 0  # seq of the last record appended and not lost
        self._synced = 0  # seq of the last record made durable
        self._pending: collections.deque[tuple[int, Callable[[], object]]] = collections.deque()
        self._lost: list[tuple[int, int]] = []  # seq ranges a failure lost (never reused)
        self._sync_lock = asyncio.Lock()
        # Why a write or fsync failed, if one did, and the last seq appended then: nothing is
        # appended or acknowledged until a snapshot taken since is saved (``superseded``).
        self._failed: str | None = None
        self._failed_seq = 0
        self._all_read = False  # ``records`` ran to its end: ``start`` may open a segment
        self.tail_cut: TailCut | None = None  # what ``records`` cut off the log's end
        # records ``records`` found missing before the log's first segment with no snapshot
        # to hold them (said in its error line): acknowledged changes lost
        self.lost_at_start = 0

    @property
    def last_seq(self) -> int:
        return self._next_seq - 1

    @property
    def failed(self) -> bool:
        """A write or fsync failed and no snapshot has been saved since."""
        return self._failed is not None

    def open(self, after_seq: int = 0, *, snapshot: bool = True) -> list[dict[str, Any]]:
        """``records`` as a list, then ``start``: for a small log (a large one is streamed)."""
        records = list(self.records(after_seq, snapshot=snapshot))
        self.start()
        return records

    def records(self, after_seq: int = 0, *, snapshot: bool = True) -> Iterator[dict[str, Any]]:
        """Yields the records after ``after_seq`` (the last record a snapshot holds) in order,
        one at a time: a segment is read a record at a time, and one whose records the
        snapshot holds whole is not read at all. A bad end of the last segment is cut off
        (``tail_cut``: a torn record, or a damaged one moved aside). Once it is exhausted,
        ``start`` opens the log for appends.

        The first segment read must begin at or before ``after_seq + 1``: ``LogGap`` if not,
        before any record is yielded; ``snapshot`` False (there is none) says the loss in an
        error line instead (``lost_at_start``: how many), and the records that remain are read
        (nothing older is held)."""
        private_directory(self.directory)
        self.tail_cut = None
        self.lost_at_start = 0
        segments = self.segments()
        read = 0  # seq of the last record read (0: none)
        follows: int | None = None  # seq the next record after the snapshot must have
        checked = False  # the first segment read begins where the snapshot ends
        for i, path in enumerate(segments):
            if i + 1 < len(segments) and int(segments[i + 1].stem) - 1 <= after_seq:
                continue  # every record of it is in the snapshot
            if not checked and int(path.stem) > after_seq + 1:
                if snapshot:
                    raise LogGap(path, after_seq)
                log.error(
                    "%s: the write-ahead log begins at record %d and there is no snapshot: "
                    "%s in one (removed?) and lost; starting from the log's records "
                    "after them alone",
                    path,
                    int(path.stem),
                    _numbers(after_seq + 1, int(path.stem) - 1, "was", "were"),
                )
                self.lost_at_start = int(path.stem) - 1 - after_seq
            checked = True
            for record in self._read(path, last=i == len(segments) - 1):
                read = seq = record["seq"]
                if seq <= after_seq:
                    continue
                # Only the records after the snapshot must follow on: a failure cuts the
                # records it lost off its segment, and the snapshot after it covers the gap.
                if follows is not None and seq != follows:
                    raise WalError(f"{self.directory}: sequence jumps from {follows - 1} to {seq}")
                follows = seq + 1
                yield record
        if read:
            self._next_seq = read + 1
        elif segments:
            self._next_seq = int(segments[-1].stem)
        # numbered after the snapshot at least: were the log lost, new records numbered below
        # it would be skipped by the next replay
        self._next_seq = max(self._next_seq, after_seq + 1)
        self._written = self._synced = self.last_seq
        self._all_read = True

    def start(self) -> None:
        """Opens a new segment for appends, numbered after every record ``records`` read."""
        assert self._all_read, "read the records first"
        self._start_segment()

    def _read(self, path: Path, *, last: bool) -> Iterator[dict[str, Any]]:
        """The records of one segment, read one at a time (a segment may hold the whole log);
        what it cuts off the end of the last segment is kept in ``tail_cut``."""
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            offset, seq = 0, int(path.stem) - 1  # the last record read (none: the stem's)
            while offset < size:
                record, end = _next_record(handle, offset, size)
                if record is None:
                    handle.seek(offset)
                    rest = handle.read()  # damage or a torn tail: the rest says which
                    if not last or _has_valid_record_after(rest, 0):
                        raise WalError(f"{path}: damaged record at byte {offset}")
                    self.tail_cut = _cut_tail(path, offset, rest, seq + 1)
                    return
                yield record
                offset, seq = end, record["seq"]

    def segments(self) -> list[Path]:
        return sorted(self.directory.glob(f"*{_SUFFIX}"), key=lambda p: int(p.stem))

    def append(self, body: dict[str, Any], apply: Callable[[], object] | None = None) -> int:
        """Buffers one record (not yet durable); returns its sequence number. ``apply`` runs
        once the record is durable, after those of the records before it; never if it is lost.

        Refused (``NotDurable``) while the log is failed, and one over the record limit
        (``WalError``): nothing is written then."""
        assert self._out is not None, "open() first"
        self._check_failed()
        seq = self._next_seq
        data = json.dumps({**body, "seq": seq}, separators=(",", ":")).encode()
        if len(data) > _MAX_RECORD:
            raise WalError(
                f"{self.directory}: a record of {len(data):,} bytes is over the write-ahead "
                f"log's limit of {_MAX_RECORD:,} bytes: not written"
            )
        self._buffer += _FRAME.pack(len(data), zlib.crc32(data))
        self._buffer += data
        self._next_seq += 1
        self._written = seq
        if apply is not None:
            self._pending.append((seq, apply))
        return seq

    async def sync(self) -> None:
        """Returns once every record appended before the call is on disk and applied; raises
        ``NotDurable`` if one of them is lost (or the log failed before it was written).

        The write, the fsync and what their outcome makes of the log (the records applied, or
        the log failed) run to their end though the caller is cancelled meanwhile (its
        deadline passed, its client went: ``to_the_end``). Before, a Store cancelled during
        its fsync left the thread's outcome unread: an EIO there failed nothing, the next
        Store was acknowledged by an fsync that no longer reports the pages the kernel
        dropped, and the cancelled Store's entry was served, its record maybe not on disk."""
        await to_the_end(self._sync(self._written), said=(WalError,))

    async def _sync(self, target: int) -> None:
        """``sync`` of the records up to ``target``."""
        async with self._sync_lock:
            if self._synced >= target and not self._was_lost(target):
                return
            self._check_failed()
            if self._was_lost(target):
                raise NotDurable(self.directory, "a write of the log failed before")
            if self._out is None:
                return
            upto = self._written
            began = self._clock()
            try:
                size = self._write()  # on the loop: the buffer must not change under the thread
                await asyncio.to_thread(os.fsync, self._out.fileno())
            except OSError as exc:
                self._fail(exc)
                self._check_failed()
            if self._on_fsync is not None:
                self._on_fsync(self._clock() - began)
            self._made_durable(upto, size)

    async def rotate(self, copy: Callable[[], T]) -> tuple[T, int]:
        """Takes ``copy()`` and starts a new segment in one step; returns it and the last seq.

        No sync is in flight meanwhile and nothing is appended between the two, so the copy
        holds exactly the records up to the returned seq: each of them durable and applied,
        or lost (a failed write) and not applied. Like ``sync``, it runs to its end though
        its caller is cancelled (its fsync's outcome is the log's).
        """
        return await to_the_end(self._rotate(copy), said=(WalError,))

    async def _rotate(self, copy: Callable[[], T]) -> tuple[T, int]:
        async with self._sync_lock:
            assert self._out is not None, "open() first"
            out = self._out
            # The old segment whole on disk before the new one exists (a torn record can then
            # only be the last segment's tail, which a reopen cuts off): fsync off the loop
            # until nothing was appended meanwhile (a few tries), the rest on the loop.
            synced = -1
            for _ in range(3):
                synced = self._written
                try:
                    size = self._write()
                    await asyncio.to_thread(os.fsync, out.fileno())
                except OSError as exc:
                    self._fail(exc)  # its records lost, so not applied: not in the copy
                    break
                self._made_durable(synced, size)
                if self._written == synced:
                    break
            if self._written != synced and not self.failed:
                synced = self._written
                try:
                    size = self._write()
                    os.fsync(out.fileno())
                except OSError as exc:
                    self._fail(exc)
                else:
                    self._made_durable(synced, size)
            taken = copy()
            last = self.last_seq
            self._start_segment()
            out.close()
            return taken, last

    def superseded(self, seq: int) -> None:
        """A snapshot now holds every record up to ``seq`` (taken after any failure up to
        it): the log appends and acknowledges again."""
        if self._failed is not None and self._failed_seq <= seq:
            self._failed = None

    def _write(self) -> int:
        """Writes the buffered records to the open segment; returns its size then."""
        assert self._out is not None
        data = memoryview(self._buffer)
        done = 0
        try:
            while done < len(data):
                wrote = self._out.write(data[done:])
                if not wrote:
                    raise OSError(errno.EIO, "a write of the log wrote nothing")
                done += wrote
                self._size += wrote
        finally:
            data.release()
        self._buffer.clear()
        return self._size

    def _made_durable(self, seq: int, size: int) -> None:
        """The records up to ``seq`` are durable (the segment's first ``size`` bytes): their
        changes are applied, in order."""
        self._synced = max(self._synced, seq)
        self._durable_size = max(self._durable_size, size)
        while self._pending and self._pending[0][0] <= self._synced:
            _, apply = self._pending.popleft()
            try:
                apply()
            except Exception:  # one change failing must not keep the others unapplied
                log.exception("applying a durable write-ahead-log record failed")

    def _fail(self, exc: OSError) -> None:
        """Every record not yet durable is lost: not applied, cut off the segment."""
        self._failed = os_error_text(exc)
        log.error(
            "%s: a write or fsync of the write-ahead log failed (%s): Stores and Drops are "
            "refused until a snapshot is saved",
            self.directory,
            self._failed,
        )
        self._failed_seq = max(self._failed_seq, self.last_seq)
        if self._written > self._synced:
            self._lost.append((self._synced + 1, self._written))
        self._written = self._synced
        self._buffer.clear()
        self._pending.clear()
        if self._out is None:
            return
        try:  # a crash must not replay a record that was never acknowledged
            fd = self._out.fileno()
            if os.fstat(fd).st_size != self._durable_size:
                os.ftruncate(fd, self._durable_size)
                os.fsync(fd)
            self._size = self._durable_size
        except OSError as cut:
            log.error("could not cut the lost records off the write-ahead log: %s", cut)

    def _was_lost(self, seq: int) -> bool:
        return any(first <= seq <= last for first, last in self._lost)

    def _check_failed(self) -> None:
        if self._failed is not None:
            raise NotDurable(self.directory, self._failed)

    def drop_through(self, seq: int) -> int:
        """Deletes the segments whose records all have seq <= ``seq``; returns how many."""
        segments = self.segments()
        dropped = 0
        for path, following in itertools.pairwise(segments):
            if int(following.stem) - 1 <= seq:
                path.unlink()
                dropped += 1
        if dropped:
            fsync_directory(self.directory)
        return dropped

    def close(self) -> None:
        if self._out is not None:
            synced = self._written
            size = self._write()
            os.fsync(self._out.fileno())
            self._made_durable(synced, size)
            self._out.close()
            self._out = None

    def _start_segment(self) -> None:
        if not self.directory.is_dir():
            # removed under the running service (an operator's rm -rf, a cleanup job): the
            # records since the last snapshot went to an unlinked file. Made again here, so
            # the snapshot this rotation is for holds them and the log goes on beside it.
            private_directory(self.directory)  # durable in its parent (fsynced there)
            log.error(
                "%s: the write-ahead log's directory was gone (removed while semantic-cache "
                "ran): made it again; the changes since the last snapshot are kept by the "
                "snapshot this rotation is for (a crash before it is saved loses them)",
                self.directory,
            )
        path = self.directory / f"{self._next_seq:020d}{_SUFFIX}"
        # 0600: every tenant's prompts and answers, in clear
        self._out = os.fdopen(open_private(path, os.O_WRONLY | os.O_APPEND), "ab", buffering=0)
        self._size = self._durable_size = os.fstat(self._out.fileno()).st_size
        fsync_directory(self.directory)


def _cut_tail(path: Path, offset: int, rest: bytes, seq: int) -> TailCut:
    """Cuts the bad end of the last segment off (``rest``, from ``offset``; ``seq`` the number
    its first record would have). Torn (its length runs past the end of the file, or it is
    zero-filled from some point to the end of the file): a crash in the middle of an append,
    never acknowledged, cut with a warning. Whole but failing its checksum: not what a crash
    leaves, and it may have been acknowledged, so the bytes are moved aside
    (``<segment>.damaged``) for the operator, with an error."""
    length = _FRAME.unpack_from(rest)[0] if len(rest) >= _FRAME.size else None
    torn = length is None or _FRAME.size + length > len(rest) or _zero_filled(rest, length)
    moved_to = None
    if not torn:
        moved_to = path.with_name(f"{path.name}.damaged")
        for n in itertools.count(2):
            if not moved_to.exists():
                break
            moved_to = path.with_name(f"{path.name}.damaged-{n}")
        with os.fdopen(open_private(moved_to, os.O_WRONLY | os.O_EXCL), "wb") as out:
            out.write(rest)
            os.fsync(out.fileno())
        fsync_directory(path.parent)
    with path.open("r+b") as out:
        out.truncate(offset)
        os.fsync(out.fileno())
    if torn:
        log.warning(
            "%s: cut off a torn record at byte %d (%d bytes): a crash in the middle of an "
            "append, never acknowledged",
            path,
            offset,
            len(rest),
        )
        return TailCut("torn", path, offset, len(rest), None)
    log.error(
        "%s: the last record, at byte %d, is whole but damaged (its checksum or body is wrong: "
        "a disk or memory error, not a crash mid-append); it is not replayed. It was probably "
        "record %d (%s), which may have been an acknowledged Store or Drop, now lost here. "
        "Its %d bytes were moved to %s for inspection",
        path,
        offset,
        seq,
        _what(rest[_FRAME.size :]),
        len(rest),
        moved_to,
    )
    return TailCut("damaged", path, offset, len(rest), moved_to)


def _numbers(first: int, last: int, one: str, more: str) -> str:
    """Records ``first`` to ``last`` and the verb (``one`` or ``more``), as a reader says them."""
    return f"record {first} {one}" if first == last else f"records {first} to {last} {more}"


def _zero_filled(rest: bytes, length: int) -> bool:
    """The bad end of a segment (``rest``, its first record of ``length``) is zeros from some
    point in that record to the end of the file: what a power loss leaves when the file's size
    grew before its data landed (ext4, XFS), not damage. All zeros (a zero header reads as
    length 0, CRC 0, which ``crc32(b"")`` passes); or a record whose last byte (a JSON body
    ends with ``}``), and all after it, are zeros. A length of 0 with a checksum is damage."""
    written = len(rest.rstrip(b"\0"))  # the bytes up to the last non-zero one
    return written == 0 or (length > 0 and written < _FRAME.size + length)


def _what(body: bytes) -> str:
    """What a damaged record seems to be, unverified (its op and tenant, nothing stored)."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return "unreadable"
    if not isinstance(parsed, dict):
        return "unreadable"
    op, tenant = parsed.get("op"), parsed.get("tenant")
    if tenant is None and isinstance(parsed.get("entry"), dict):
        tenant = parsed["entry"].get("tenant")
    return f"it reads, unverified, as op {op!r} of tenant {tenant!r}"


def _next_record(
    handle: io.BufferedReader, offset: int, size: int
) -> tuple[dict[str, Any] | None, int]:
    """The record at ``offset`` (the handle's position) and where it ends; None if it is
    torn or damaged."""
    header = handle.read(_FRAME.size)
    if len(header) < _FRAME.size:
        return None, offset
    length, crc = _FRAME.unpack(header)
    end = offset + _FRAME.size + length
    if end > size or length == 0:  # no record is written empty (its body holds its seq)
        return None, offset
    return _body(handle.read(length), crc), end


def _record(data: bytes, offset: int) -> tuple[dict[str, Any] | None, int]:
    if offset + _FRAME.size > len(data):
        return None, offset
    length, crc = _FRAME.unpack_from(data, offset)
    start, end = offset + _FRAME.size, offset + _FRAME.size + length
    if end > len(data) or length == 0:
        return None, offset
    body = _body(data[start:end], crc)
    return (body, end) if body is not None else (None, offset)


def _body(data: bytes, crc: int) -> dict[str, Any] | None:
    """A record's body if its bytes are whole (``crc``) and hold a JSON object with a seq."""
    if zlib.crc32(data) != crc:
        return None
    try:
        body = json.loads(data)
    except ValueError:
        return None
    if not isinstance(body, dict) or not isinstance(body.get("seq"), int):
        return None
    return body


def _has_valid_record_after(data: bytes, offset: int) -> bool:
    """A whole record later in the file means damage in the middle, not a torn tail."""
    return any(_record(data, i)[0] is not None for i in range(offset + 1, len(data) - _FRAME.size))
