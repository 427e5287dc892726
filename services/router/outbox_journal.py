"""The billing outbox's journal: its entries on disk, only their ids and places in memory.

The file holds lines ``{"add": id, "commits": [base64...], "trace": {...}, "v": 2}`` and
``{"done": id}`` (``trace``: the W3C ``traceparent`` carrier of the request the commits bill,
so their replay joins its trace; absent in lines written before it was kept; ``v``: the
record's version, absent in version 1). Version 2 adds ``"open": true``: an open call, the
FINAL (and, if prefix-cache did not acknowledge it, the WARM) that bills a model call still
running, with the output tokens produced so far, and ``"started_ms"``: when the call started
(epoch ms: the budget periods its cost counts in; absent in open calls written before it was
kept, which count in the periods of their bill). An "add" line with an id already pending
replaces its entry (the call's output count grows, or its outbox entry takes its place), and
its "done" line settles it. A version-1 reader reads an open call as any other entry, and bills
it at its start: what it is for. An answer's entry also holds ``"estimate"`` (the cost its
tenant's budgets counted it at, nano-dollars) and ``"counted_ms"`` (when: the budget periods),
so that its replay, after a restart too, corrects the budgets by what prefix-cache bills
(``Counted``); a line without them (an older router's, an open call) corrects nothing, and
readers that do not know them ignore them. A line of a version above ``JOURNAL_VERSION`` (a
newer router's, left by a rollback) is neither billed nor dropped: this build cannot tell what
its fields mean, so it keeps the line in the file, as it stands, through every rewrite, until a
router that reads it (or a later line of its id) settles it, and says so at ERROR when it
loads the journal (``newer``). Before, such a line was read as this version's: billed under
this build's reading, or dropped as unreadable, and the file emptied under it. An entry's
commits (each carrying its whole request) are read back from the file when they are sent, so
an outage of prefix-cache costs disk, not the router's memory. The file is emptied once
nothing is pending, and rewritten with only the pending lines once its settled lines outweigh
them (``COMPACT_BYTES``), so an entry that stays pending for days does not pin every line
written after it. A settled line that carried a request's text (a WARM prefix-cache did not
take: the prompt, its tools and earlier turns) is rewritten away as soon as the settled lines
outweigh the pending ones, without waiting for ``COMPACT_BYTES`` (as are the settled lines a
start finds, whose text is not read to tell): before, while any entry stayed pending (a call
in flight, a newer router's line), the text of an outage's billed requests stayed in the file
until 64 MiB of later lines came (716,046 settled open calls), for days on a quiet router.

``Journal`` is confined to one thread (``JournalThread`` runs it:
``outbox_journal_thread.py``): it writes without fsync and ``sync`` makes a batch of writes
durable with one fsync, so concurrent answers share it. The journal is the one record of what
is pending: an entry written is billed, whatever became of the call that wrote it. One router
at a time: a ``Journal`` holds an exclusive ``flock`` of ``.billing-outbox.lock`` beside the
file until it is closed (two writing one file at their own idea of its end would overwrite each
other's entries), and one that finds it held is a ``ConfigError`` naming ``ROUTER_DATA_DIR``,
as is a directory it cannot create or write. A failed fsync is sticky: the kernel may have
dropped the unwritten pages, so no later write is acknowledged until a fresh file holding every
pending entry (or an empty one) has been fsynced. Meanwhile the file itself is not fsynced
again (that would prove nothing, and a failing disk may take long over each), and the rewrite
is tried at a write ``REWRITE_RETRY_S`` after a failed one, the delay doubling up to
``REWRITE_RETRY_MAX_S``; ``JournalThread`` says the failure once as it starts, then once every
``FAILING_LOG_S`` with how many syncs failed, and once when the writes are durable again. A
write that fails (a full disk: ENOSPC) is a failure of the same kind, counted and said the same
way (before, only fsyncs were: a full disk left the metric at 0). A journal file removed or
replaced while the router runs (its descriptor writes to a file no longer at
``billing-outbox.jsonl``, lost at the next start) is found at the next sync (``fstat``'s link
count 0, or another inode at the path), said at ERROR once, counted (``lost``), and rewritten
from the pending entries the descriptor still holds (a rewrite, as after a failed fsync: until
it succeeds no write is acknowledged as durable). The whole ``ROUTER_DATA_DIR`` removed (an
``rm -rf``, a clean-up job) is made again (0700) by that rewrite, and its lock file taken
again, so that another router started meanwhile cannot take the directory (one that already did
makes the rewrite fail, said at ERROR, and tried again).
"""

from __future__ import annotations

import base64
import errno
import fcntl
import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.env import ConfigError
from services.common.files import fsync_directory
from services.common.private_files import open_private, private_directory, tighten

log = logging.getLogger("cachemesh.router.outbox")

JOURNAL_NAME = "billing-outbox.jsonl"
COMPACTING_NAME = "billing-outbox.compacting"  # a rewrite's new file, renamed over the journal
LOCK_NAME = ".billing-outbox.lock"  # held by the one router using the directory
# Rewrite the file once it holds this many bytes of settled lines, and more than its live ones.
COMPACT_BYTES = 64 * 1024 * 1024
# after a failed rewrite, the next is tried this much later, doubled after each that fails
# up to REWRITE_RETRY_MAX_S (a rewrite writes every pending line: not each second for hours)
REWRITE_RETRY_S = 1.0
REWRITE_RETRY_MAX_S = 30.0
READ_BYTES = 16 * 1024 * 1024  # the journal is loaded this much at a time


class JournalError(OSError):
    """The journal could not take a write durably. ``written``: the entry is in the journal
    all the same (only its durability failed), so it will be billed if the router lives."""

    def __init__(self, message: str, *, written: bool) -> None:
        super().__init__(message)
        self.written = written


@dataclass(frozen=True)
class Counted:
    """What an answer kept in the outbox was counted at against its tenant's budgets: the
    router's estimate, in nano-dollars, and when (ms since the epoch: its day and month)."""

    estimate_nanos: int
    at_ms: int


class UnreadableEntry(ValueError):
    """An entry's line on disk does not decode (the disk or an outside write changed it)."""


JOURNAL_VERSION = 2  # of the records this code writes; it reads version 1's too, and keeps
# a newer version's lines unread (``Journal.newer``)


@dataclass(frozen=True)
class _Line:
    offset: int
    length: int
    open: bool = False  # an open call: a model call still running when it was written
    text: bool = False  # its commits carry a request (a WARM sent with it): the caller's text
    version: int = JOURNAL_VERSION  # a kept newer line's "v" (``load`` says them)


class JournalEntry(NamedTuple):
    """An entry read back from its line."""

    commits: tuple[pc.CommitRequest, ...]
    carrier: dict[str, str]  # the request's trace context (empty: none kept, or unreadable)
    started_ms: int | None  # an open call's: when its model call started (None: not kept)
    counted: Counted | None  # an answer's: what its budgets counted (None: not kept)


class Journal:
    """The journal file of ``directory``. Not thread-safe: one thread at a time."""

    def __init__(
        self,
        directory: Path,
        compact_bytes: int = COMPACT_BYTES,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = directory / JOURNAL_NAME
        self._compact_bytes = compact_bytes
        try:
            private_directory(directory)
            self._lock_fd = _lock(directory / LOCK_NAME)
        except OSError as exc:
            raise _unusable(directory, exc) from None
        try:
            names = (LOCK_NAME, JOURNAL_NAME, COMPACTING_NAME)
            tighten([directory, *(directory / name for name in names)], "ROUTER_DATA_DIR", log)
            made = not self.path.exists()
            self._fd = open_private(self.path, os.O_RDWR)
            if made:  # its entry in the directory durable before any line in it is
                fsync_directory(directory)
        except BaseException as exc:
            os.close(self._lock_fd)
            if isinstance(exc, OSError):
                raise _unusable(directory, exc) from None
            raise
        self._lines: dict[str, _Line] = {}  # the pending entries, in the order they came
        # lines of a newer version (by entry id, or ``@<offset>`` for one without): kept as
        # they are, neither billed nor settled by this build
        self._newer: dict[str, _Line] = {}
        self._size = 0
        self._live_bytes = 0
        # a settled line carried a request's text (or may have: one a start found settled),
        # which a compaction removes once the settled lines outweigh the pending ones
        self._settled_text = False
        self._dirty = False
        self._failed: OSError | None = None
        self._monotonic = monotonic
        self._retry_rewrite_at = -math.inf  # after a failed rewrite: when to try again
        self._rewrite_retry_s = REWRITE_RETRY_S  # the wait after the next rewrite that fails
        self._file_lost = False  # the file was found removed or replaced, not rewritten yet
        self.lost = 0  # the times the file was found removed or replaced (read by its thread)

    def load(self) -> list[str]:
        """The pending entries' ids, oldest first. A torn last line (a crash mid-append: its
        answer was never sent) is cut off, so the next line starts on a line of its own; only
        bytes after the file's last newline are (a read may return fewer bytes than asked:
        Linux caps one at 2 GiB, so the file is read in chunks until its whole size is in)."""
        size = os.fstat(self._fd).st_size
        self._lines.clear()
        self._newer.clear()
        end = 0  # where the last whole line read ends
        for raw in self._whole_lines(size):
            self._take(raw, end)
            end += len(raw)
        if end < size:
            os.ftruncate(self._fd, end)
            os.fsync(self._fd)
        self._size = end
        self._live_bytes = sum(
            line.length for line in (*self._lines.values(), *self._newer.values())
        )
        self._settled_text = self._size > self._live_bytes  # not read: any may hold text
        if self._newer:
            seen = Counter(line.version for line in self._newer.values())
            log.error(
                "billing outbox: %d lines of %s are of a journal version above %d (%s): a "
                "newer router's, which this one neither bills nor drops but keeps in the file "
                "for a router of that version to bill (start one on this ROUTER_DATA_DIR to "
                "bill them); if no router of that version ever ran on this directory, the line "
                'is damaged (its "v" changed), billed by no router until it is mended or '
                "removed by hand, with the router stopped",
                len(self._newer),
                self.path,
                JOURNAL_VERSION,
                ", ".join(f"version {v} (x{n})" for v, n in sorted(seen.items())),
            )
        return list(self._lines)

    def _whole_lines(self, size: int) -> Iterator[bytes]:
        """The file's lines up to its last newline (each with its newline), read ``READ_BYTES``
        at a time: the whole journal is never in memory at once."""
        buffer = bytearray()
        read = 0
        while read < size:
            chunk = os.pread(self._fd, min(READ_BYTES, size - read), read)
            if not chunk:  # shorter than its size said: what was read is all there is
                break
            read += len(chunk)
            start = len(buffer)
            buffer += chunk
            cut = buffer.rfind(b"\n", start) + 1
            if cut:
                yield from bytes(buffer[:cut]).splitlines(keepends=True)
                del buffer[:cut]

    def _take(self, raw: bytes, offset: int) -> None:
        """One line of the file, at ``offset``: an entry added, or settled."""
        try:
            item = json.loads(raw)
        except (ValueError, RecursionError):  # not JSON, a number of over 4,300 digits, a
            item = {}  # nesting past the recursion limit: an unreadable line, not a crash
        version = item.get("v") if isinstance(item, dict) else None
        if type(version) is int and version > JOURNAL_VERSION:
            entry_id = item.get("add")
            key = entry_id if isinstance(entry_id, str) else f"@{offset}"
            self._lines.pop(key, None)  # a later line of its id replaces it, as any
            # ... and takes its place in the order: a compaction writes the kept lines in it
            # (add n1, done n1, add n1 kept as add, done would read as settled)
            self._newer.pop(key, None)
            self._newer[key] = _Line(offset, len(raw), version=version)
        elif isinstance(item, dict) and isinstance(item.get("add"), str):
            self._newer.pop(item["add"], None)
            self._lines[item["add"]] = _Line(offset, len(raw), item.get("open") is True)
        elif isinstance(item, dict) and isinstance(item.get("done"), str):
            self._lines.pop(item["done"], None)
            self._newer.pop(item["done"], None)
        else:
            log.error("billing outbox: line at byte %d of %s is unreadable", offset, self.path)

    def add(
        self,
        entry_id: str,
        commits: Sequence[pc.CommitRequest],
        carrier: Mapping[str, str] | None = None,
        *,
        open_call: bool = False,
        started_ms: int | None = None,
        counted: Counted | None = None,
    ) -> None:
        """``carrier``: the request's trace context (``traceparent``), for the replay's span.
        ``open_call``: the commits bill a model call still running (``opened``), which started
        at ``started_ms`` (epoch ms, the wall clock's); ``counted``: what an answer's budgets
        counted. An id already pending is replaced."""
        raw = [base64.b64encode(c.SerializeToString()).decode() for c in commits]
        record: dict[str, object] = {"add": entry_id, "commits": raw}
        if carrier:
            record["trace"] = dict(carrier)
        record["v"] = JOURNAL_VERSION
        if open_call:
            record["open"] = True
            if started_ms is not None:
                record["started_ms"] = started_ms
        if counted is not None:
            record["estimate"] = counted.estimate_nanos
            record["counted_ms"] = counted.at_ms
        line = self._write(record, open_call)
        if any(commit.HasField("request") for commit in commits):
            line = replace(line, text=True)
        replaced = self._lines.get(entry_id)
        if replaced is not None:
            self._live_bytes -= replaced.length
            self._settled_text |= replaced.text
        self._lines[entry_id] = line
        self._live_bytes += line.length

    def done(self, entry_id: str) -> None:
        # A done line carries no "v" (read as version 1): a later router's keeps a "v" of at
        # most 2 unless routers of this version must not settle with it, for one above 2 is
        # kept unread by them, and the entry it settles replayed again at their start (billed
        # twice once prefix-cache's record of its commit has expired).
        line = self._lines.pop(entry_id, None)
        if line is not None:
            self._live_bytes -= line.length
            self._settled_text |= line.text
            self._write({"done": entry_id})  # ``sync`` empties the file if nothing is pending

    def pending(self) -> list[str]:
        """The pending entries' ids, oldest first."""
        return list(self._lines)

    def opened(self) -> list[str]:
        """The pending entries that are open calls, oldest first."""
        return [entry_id for entry_id, line in self._lines.items() if line.open]

    def is_open(self, entry_id: str) -> bool:
        line = self._lines.get(entry_id)
        return line is not None and line.open

    @property
    def newer(self) -> int:
        """The lines of a newer version kept unread (``load`` said how many)."""
        return len(self._newer)

    @property
    def pending_count(self) -> int:
        return len(self._lines)

    def holds(self, entry_id: str) -> bool:
        """The entry is pending (a read of the pending ids, safe from another thread)."""
        return entry_id in self._lines

    def read(self, entry_id: str) -> tuple[pc.CommitRequest, ...]:
        return self.read_traced(entry_id).commits

    def read_traced(self, entry_id: str) -> JournalEntry:
        """The entry's commits, its trace carrier (empty: none was kept, or it is not a
        map of strings; the commits are billed all the same), when an open call started and
        what an answer's budgets counted (each None when not kept: an older line)."""
        line = self._lines[entry_id]
        raw = _read_all(self._fd, line.length, line.offset)
        try:
            item = json.loads(raw)
            if item.get("add") != entry_id:
                raise ValueError(f"the line holds {item.get('add')!r}")
            commits = tuple(
                pc.CommitRequest.FromString(base64.b64decode(c)) for c in item["commits"]
            )
        except Exception as exc:  # any decoding fault means the same
            raise UnreadableEntry(
                f"entry {entry_id} at byte {line.offset} of {self.path} does not decode: {exc}"
            ) from exc
        carrier = item.get("trace")
        if not isinstance(carrier, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in carrier.items()
        ):
            carrier = {}
        estimate, at_ms = item.get("estimate"), item.get("counted_ms")
        counted = None
        if type(estimate) is int and type(at_ms) is int:  # not a bool, nor a float
            counted = Counted(estimate, at_ms)
        started = item.get("started_ms")
        started_ms = started if type(started) is int else None
        return JournalEntry(commits, carrier, started_ms, counted)

    def sync(self, *, fsync: bool = True) -> None:
        """Makes every write so far durable (one fsync), emptying or compacting the file first
        when it is due. Raises ``JournalError`` if they may not be. ``fsync`` False: only the
        emptying or compacting, for a batch none of whose writes waits to be durable (open
        calls, "done" lines): their fsync comes with the next batch that needs one."""
        if self._gone():
            self._rewrite_lost(fsync)
            return
        if not self._lines and not self._newer and self._size:
            os.ftruncate(self._fd, 0)
            self._size, self._live_bytes, self._dirty = 0, 0, True
            self._settled_text = False
            self._retry_rewrite_at, self._rewrite_retry_s = -math.inf, REWRITE_RETRY_S
        elif (self._lines or self._newer) and (
            self._failed is not None or self._due_for_compaction()
        ):
            # a fresh file, fsynced, is also how a failed fsync is put behind
            self._compact()
        if not fsync:
            return
        # after a failed fsync, another of the same file proves nothing (only a fresh file, or
        # an empty one, does), and a failing disk may take long over each
        if self._dirty and (self._failed is None or not self._size):
            try:
                os.fsync(self._fd)
            except OSError as exc:
                self._failed = exc
                raise JournalError(f"fsync of {self.path} failed: {exc}", written=True) from exc
            self._dirty = False
            if not self._size:
                self._failed = None  # nothing pending, and the empty file is durable
        if self._failed is not None:
            raise JournalError(
                f"an earlier fsync of {self.path} failed ({self._failed}): no write is durable "
                "until a rewrite of the journal succeeds or every pending entry is billed",
                written=True,
            ) from self._failed

    def _gone(self) -> bool:
        """The file this journal writes is no longer the one at its path (removed, or another
        put there): what is written to it would be lost at the next start."""
        try:
            held = os.fstat(self._fd)
            if held.st_nlink == 0:
                return True
            there = os.stat(self.path)
        except FileNotFoundError:
            return True
        except OSError:
            return False  # cannot tell (the disk's fault): the writes and fsyncs will say
        return (there.st_dev, there.st_ino) != (held.st_dev, held.st_ino)

    def _rewrite_lost(self, fsync: bool) -> None:
        """The file was removed or replaced: rewritten from the pending lines the descriptor
        still holds (said once, counted once). Until the rewrite succeeds no write is durable
        (sticky, as a failed fsync; tried again as a failed rewrite is)."""
        if not self._file_lost:
            self._file_lost = True
            self.lost += 1
            self._retry_rewrite_at, self._rewrite_retry_s = -math.inf, REWRITE_RETRY_S
            log.error(
                "billing outbox: %s was removed or replaced while the router runs: its %d "
                "pending bills are held only by this process; rewriting it from them (do not "
                "remove files under ROUTER_DATA_DIR while the router runs)",
                self.path,
                len(self._lines),
            )
        if self._failed is None:
            self._failed = OSError(errno.ENOENT, "the journal file was removed", str(self.path))
        self._compact()
        if not self._gone():
            self._file_lost = False
        if self._failed is not None and fsync:
            raise JournalError(
                f"{self.path} was removed or replaced and its rewrite has not succeeded "
                f"({self._failed}): no write is durable until it does",
                written=True,
            )

    def _relock(self) -> None:
        """The directory and the lock file made again if they were removed, the lock taken
        again (an ``OSError`` if it cannot be: another router now holds it)."""
        if os.fstat(self._lock_fd).st_nlink:
            return  # the lock file is still the one at its path's place, and so the directory
        private_directory(self.path.parent)
        try:
            fd = _lock(self.path.parent / LOCK_NAME)
        except ConfigError as exc:
            raise OSError(errno.EBUSY, str(exc)) from None
        log.error(
            "billing outbox: %s was removed while the router runs; made again, its lock taken "
            "again (do not remove ROUTER_DATA_DIR while the router runs)",
            self.path.parent,
        )
        os.close(self._lock_fd)
        self._lock_fd = fd

    @property
    def dirty(self) -> bool:
        """Some write is not fsynced yet (read between batches, not during one)."""
        return self._dirty

    def close(self) -> None:
        """Closes the file and lets another router use the directory."""
        os.close(self._fd)
        os.close(self._lock_fd)  # releases the lock

    def _due_for_compaction(self) -> bool:
        """The settled lines outweigh the pending ones and ``compact_bytes``, or carried a
        request's text: each rewrite then costs at most the bytes written since the last one."""
        settled = self._size - self._live_bytes
        floor = 0 if self._settled_text else self._compact_bytes
        return settled > max(floor, self._live_bytes)

    def _write(self, record: dict[str, object], open_call: bool = False) -> _Line:
        data = (json.dumps(record) + "\n").encode()
        try:
            _write_all(self._fd, data, self._size)  # after the last line, even if one is torn
        except OSError:
            os.ftruncate(self._fd, self._size)  # no half line for the next one to follow
            raise
        line = _Line(self._size, len(data), open_call)
        self._size += len(data)
        self._dirty = True
        return line

    def _compact(self) -> None:
        """Rewrites the file with only the pending lines: a new file, fsynced, renamed over,
        the directory fsynced. A failure before the rename leaves the old file in use (tried
        again ``REWRITE_RETRY_S`` later, the delay doubled after each failure up to
        ``REWRITE_RETRY_MAX_S``; said at ERROR once, the first); after it, the new file is in
        use and a failed directory fsync is a failed fsync (sticky)."""
        if self._monotonic() < self._retry_rewrite_at:
            return
        fresh = self.path.with_name(COMPACTING_NAME)
        lines: dict[str, _Line] = {}
        newer: dict[str, _Line] = {}
        size = 0
        try:
            self._relock()
            fresh.unlink(missing_ok=True)  # a crashed rewrite's, whatever its mode
            fd = open_private(fresh, os.O_RDWR | os.O_EXCL)
            try:
                kept = [(self._newer, newer), (self._lines, lines)]
                for held, into in kept:  # a newer version's lines kept first, as they are
                    for entry_id, line in held.items():
                        _write_all(fd, _read_all(self._fd, line.length, line.offset), size)
                        into[entry_id] = replace(line, offset=size)
                        size += line.length
                os.fsync(fd)
                os.replace(fresh, self.path)
            except BaseException:
                os.close(fd)
                fresh.unlink(missing_ok=True)
                raise
        except OSError as exc:  # the old file still holds every pending entry
            # again in a second: soon enough to put a failed fsync behind once the disk is
            # back, not a rewrite of the whole journal at every write while it is not; later
            # ones wait longer, up to REWRITE_RETRY_MAX_S
            wait = self._rewrite_retry_s
            self._retry_rewrite_at = self._monotonic() + wait
            self._rewrite_retry_s = min(wait * 2, REWRITE_RETRY_MAX_S)
            said = log.error if wait == REWRITE_RETRY_S else log.debug  # the first of a run
            said(
                "billing outbox: rewriting %s failed: %s (tried again %.0f s later, then up "
                "to every %.0f s)",
                self.path,
                exc,
                wait,
                REWRITE_RETRY_MAX_S,
            )
            return
        os.close(self._fd)
        self._fd, self._lines, self._newer, self._size = fd, lines, newer, size
        self._live_bytes, self._dirty, self._settled_text = size, False, False
        self._retry_rewrite_at, self._rewrite_retry_s = -math.inf, REWRITE_RETRY_S
        try:
            fsync_directory(self.path.parent)
        except OSError as exc:
            self._failed = exc
            raise JournalError(
                f"fsync of {self.path.parent} after rewriting the journal failed: {exc}",
                written=True,
            ) from exc
        self._failed = None  # every pending entry is in a file fsynced since
        log.info("billing outbox: journal rewritten with its %d pending entries", len(lines))


def _write_all(fd: int, data: bytes, offset: int) -> None:
    """``pwrite`` until every byte is written (a short write is not an error to the OS)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(f"pwrite wrote {written} bytes")
        view, offset = view[written:], offset + written


def _lock(path: Path) -> int:
    """An open descriptor of ``path`` holding its exclusive ``flock``; a ``ConfigError`` if
    another process (or another ``Journal`` of this one) holds it."""
    fd = open_private(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(
            f"ROUTER_DATA_DIR: another router is using {str(path.parent)[:200]!r} (it holds "
            f"{path.name}); give each router a data directory of its own, or stop the other"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _unusable(directory: Path, exc: OSError) -> ConfigError:
    """A data directory that cannot be made or written (a file, a read-only mount, no
    permission): the start-up's one line, naming the variable and what to do."""
    return ConfigError(
        f"ROUTER_DATA_DIR={str(directory)[:200]}: cannot create or write the directory "
        f"({exc.strerror or type(exc).__name__}); name a directory this router can create and "
        "write, or leave it unset to keep the billing outbox in memory"
    )


def _read_all(fd: int, length: int, offset: int) -> bytes:
    """``pread`` until ``length`` bytes are in (or the file ends): a read may return fewer."""
    parts: list[bytes] = []
    while length > 0:
        part = os.pread(fd, length, offset)
        if not part:
            break
        parts.append(part)
        length, offset = length - len(part), offset + len(part)
    return b"".join(parts)
