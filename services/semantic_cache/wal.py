"""The write-ahead log: every acknowledged change, durable before Store or Drop returns.

Records are appended to segment files ``<data dir>/wal/<first seq, 20 digits>.log``, each
framed as 4 bytes of length (big-endian), 4 bytes of CRC-32 and a JSON body carrying its
sequence number. Appends are buffered writes made on the event loop, in the order of the
changes; ``sync`` makes everything appended so far durable (one fsync in a thread covers every
waiting writer: a group commit) and callers acknowledge only after it returns.

A snapshot records the last sequence number it contains and the log is rotated when it is
taken; segments entirely covered by a saved snapshot are deleted. On start the log is read in
order: a torn record at the very end of the last segment (a crash during an append that was
never acknowledged) is cut off; any other damage is an error naming the file, never skipped.
``append`` refuses a record over ``_MAX_RECORD``; reading takes a record of any length whose
bytes and CRC are whole (a log written before appends were bounded may hold a larger one,
acknowledged): it is replayed, never taken for damage or a torn tail.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

from services.common.files import fsync_directory

_FRAME = struct.Struct(">II")  # length, crc32
_MAX_RECORD = 64 << 20  # the largest record appended (the cache stores smaller: cache.py)
_SUFFIX = ".log"
T = TypeVar("T")


class WalError(RuntimeError):
    """The log is damaged somewhere other than its torn tail; the message names the file."""


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
        self._out: IO[bytes] | None = None
        self._next_seq = 1
        self._written = 0  # seq of the last record written to the OS
        self._synced = 0  # seq of the last record made durable
        self._sync_lock = asyncio.Lock()
        # Why an fsync failed, if one did, and the last record it was to make durable: the
        # kernel may have dropped those pages and a later fsync would still succeed, so nothing
        # is acknowledged as durable until a snapshot holds those records (``superseded``).
        self._failed: str | None = None
        self._failed_seq = 0

    @property
    def last_seq(self) -> int:
        return self._next_seq - 1

    def open(self, after_seq: int = 0) -> list[dict[str, Any]]:
        """Reads every record (cutting a torn tail), then opens a new segment for appends,
        numbered after ``after_seq`` at least (the last record a snapshot holds: were the log
        lost, new records numbered below it would be skipped by the next replay)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        segments = self.segments()
        records: list[dict[str, Any]] = []
        for i, path in enumerate(segments):
            records.extend(_read(path, last=i == len(segments) - 1))
        for prev, record in itertools.pairwise(records):
            if record["seq"] != prev["seq"] + 1:
                raise WalError(
                    f"{self.directory}: sequence jumps from {prev['seq']} to {record['seq']}"
                )
        if records:
            self._next_seq = records[-1]["seq"] + 1
        elif segments:
            self._next_seq = int(segments[-1].stem)
        self._next_seq = max(self._next_seq, after_seq + 1)
        self._written = self._synced = self.last_seq
        self._start_segment()
        return records

    def segments(self) -> list[Path]:
        return sorted(self.directory.glob(f"*{_SUFFIX}"), key=lambda p: int(p.stem))

    def append(self, body: dict[str, Any]) -> int:
        """Writes one record (not yet durable); returns its sequence number. One over the
        record limit is refused (``WalError``) and nothing is written."""
        assert self._out is not None, "open() first"
        seq = self._next_seq
        data = json.dumps({**body, "seq": seq}, separators=(",", ":")).encode()
        if len(data) > _MAX_RECORD:
            raise WalError(
                f"{self.directory}: a record of {len(data):,} bytes is over the write-ahead "
                f"log's limit of {_MAX_RECORD:,} bytes: not written"
            )
        self._out.write(_FRAME.pack(len(data), zlib.crc32(data)) + data)
        self._next_seq += 1
        self._written = seq
        return seq

    async def sync(self) -> None:
        """Returns once every record appended before the call is on disk."""
        target = self._written
        async with self._sync_lock:
            self._check_failed()
            if self._synced >= target or self._out is None:
                return
            upto = self._written
            out = self._out
            out.flush()  # on the loop: the buffer must not change under the thread
            began = self._clock()
            try:
                await asyncio.to_thread(os.fsync, out.fileno())
            except OSError as exc:
                self._fail(exc, upto)
                self._check_failed()
            if self._on_fsync is not None:
                self._on_fsync(self._clock() - began)
            self._synced = max(self._synced, upto)

    async def rotate(self, copy: Callable[[], T]) -> tuple[T, int]:
        """Takes ``copy()`` and starts a new segment in one step; returns it and the last seq.

        No sync is in flight meanwhile and nothing is appended between the two, so the copy
        holds exactly the records up to the returned seq.
        """
        async with self._sync_lock:
            assert self._out is not None, "open() first"
            out = self._out
            # The old segment whole on disk before the new one exists (a torn record can then
            # only be the last segment's tail, which a reopen cuts off): fsync off the loop
            # until nothing was appended meanwhile (a few tries), the rest on the loop.
            synced = -1
            for _ in range(3):
                synced = self._written
                out.flush()
                try:
                    await asyncio.to_thread(os.fsync, out.fileno())
                except OSError as exc:  # the copy is from memory: the snapshot holds it all
                    self._fail(exc, synced)
                if self._written == synced:
                    break
            taken = copy()
            last = self.last_seq
            if self._written != synced:
                out.flush()
                try:
                    os.fsync(out.fileno())
                except OSError as exc:
                    self._fail(exc, last)
            self._start_segment()
            out.close()
            self._synced = max(self._synced, last)
            return taken, last

    def superseded(self, seq: int) -> None:
        """A snapshot now holds every record up to ``seq``: a failed fsync of those no longer
        matters, and the log acknowledges again."""
        if self._failed is not None and self._failed_seq <= seq:
            self._failed = None

    def _fail(self, exc: OSError, seq: int) -> None:
        self._failed = f"{type(exc).__name__}: {exc}"
        self._failed_seq = max(self._failed_seq, seq)

    def _check_failed(self) -> None:
        if self._failed is not None:
            raise WalError(
                f"{self.directory}: an fsync of the write-ahead log failed ({self._failed}); "
                "no change is acknowledged as durable until the next snapshot holds them "
                "(check the disk)"
            )

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
            self._out.flush()
            os.fsync(self._out.fileno())
            self._out.close()
            self._out = None

    def _start_segment(self) -> None:
        path = self.directory / f"{self._next_seq:020d}{_SUFFIX}"
        self._out = path.open("ab")
        fsync_directory(self.directory)


def _read(path: Path, *, last: bool) -> list[dict[str, Any]]:
    data = path.read_bytes()
    records: list[dict[str, Any]] = []
    offset = 0
    while offset < len(data):
        record, end = _record(data, offset)
        if record is None:
            if not last or _has_valid_record_after(data, offset):
                raise WalError(f"{path}: damaged record at byte {offset}")
            with path.open("r+b") as handle:  # a torn tail: never acknowledged, cut it off
                handle.truncate(offset)
                os.fsync(handle.fileno())
            break
        records.append(record)
        offset = end
    return records


def _record(data: bytes, offset: int) -> tuple[dict[str, Any] | None, int]:
    if offset + _FRAME.size > len(data):
        return None, offset
    length, crc = _FRAME.unpack_from(data, offset)
    start, end = offset + _FRAME.size, offset + _FRAME.size + length
    if end > len(data) or zlib.crc32(data[start:end]) != crc:
        return None, offset
    try:
        body = json.loads(data[start:end])
    except ValueError:
        return None, offset
    if not isinstance(body, dict) or not isinstance(body.get("seq"), int):
        return None, offset
    return body, end


def _has_valid_record_after(data: bytes, offset: int) -> bool:
    """A whole record later in the file means damage in the middle, not a torn tail."""
    return any(_record(data, i)[0] is not None for i in range(offset + 1, len(data) - _FRAME.size))
