"""A file several processes share, held in memory and re-read off the event loop when it changes.

The key file (``key_store``) is read on the path of every request; a re-read of a large one
(10k keys, 2 MB: 151 ms to parse) on the event loop stalled every request behind it, in every
router and HTTP front, at every key change. Here a caller's ``current()`` never reads the file:
it looks at the file's (inode, size, mtime) at most every ``poll_s`` (one ``stat``) and, when it
changed, starts a re-read in a worker thread; the value read last stays in force until the new
one is complete, then is swapped in whole (one assignment: no caller sees half of it). A change
therefore shows within ``poll_s`` plus one re-read (two when it landed during one: a poll that
sees a change while a re-read runs makes one more run after it).

One re-read or ``write`` at a time (``write``: the process's own change, shown at once): each
shows the file as it was when it ran, so none shows an older file over a newer one.

``current()`` of a process that had no caller since a change (an idle router) starts the re-read
and answers the value read before it: the first request after a change of another process's
was held to what the file said before (a tenant whose budget was raised from $0 refused
"renews in 11.3 h", with that retry-after). ``fresh()`` is ``current()`` that, for a caller
that can wait (an async one), waits for the re-read the change started, a bounded time:
until that re-read's start plus ``FRESH_WAIT_S``, never longer. A re-read that hangs (a FIFO in
the file's place, a stuck NFS mount) made every request wait the whole second, for as long as
it hung (48-60 ms -> 1,051-1,070 ms each); now only the requests within its first second wait,
and one WARNING names the file when it passes that.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from services.common.keyfile import LockedFile, Signature

Start = Callable[[Callable[[], None]], None]  # runs a job off the caller's thread
T = TypeVar("T")

# At most how long ``fresh`` waits for a re-read (a small file's takes about a millisecond).
FRESH_WAIT_S = 1.0


def in_a_thread(name: str) -> Start:
    """Each job in a daemon thread of its own (a re-read is rare: a thread is not kept)."""

    def start(job: Callable[[], None]) -> None:
        threading.Thread(target=job, name=name, daemon=True).start()

    return start


class Source(Protocol[T]):
    """How a file is looked at and read. ``load`` gets the value read last (to reuse what did
    not change) and raises ``PolledFile``'s ``unreadable`` (try again at the next poll) or
    ``malformed`` (keep the value read last until the file changes again)."""

    @property
    def path(self) -> Path: ...

    def signature(self) -> Signature | None: ...

    def load(self, last: T) -> tuple[T, Signature | None]: ...


class FileSource(Generic[T]):
    """A ``Source`` over a ``LockedFile``: its path and signature, and ``load`` (given the value
    read last) for its contents. The key file and the per-tenant limits file each give their
    own ``load``."""

    def __init__(self, file: LockedFile, load: Callable[[T], tuple[T, Signature | None]]) -> None:
        self._file = file
        self.load = load

    @property
    def path(self) -> Path:
        return self._file.path

    def signature(self) -> Signature | None:
        return self._file.signature()


class _Unchecked(enum.Enum):
    """The file could not be looked at (the error is logged)."""

    UNCHECKED = 0


@dataclass(frozen=True)
class _Held(Generic[T]):
    value: T
    signature: Signature | None  # of the file ``value`` was read from (or last refused)


class PolledFile(Generic[T]):
    def __init__(
        self,
        source: Source[T],
        first: tuple[T, Signature | None],
        *,
        monotonic: Callable[[], float],
        poll_s: float,
        start: Start,
        log: logging.Logger,
        what: str,
        contents: str,
        unreadable: type[Exception],
        malformed: type[Exception],
        loaded: Callable[[T], str] = lambda _: "",
        gone_is_read: bool = False,
    ) -> None:
        """``first``: the value read at start-up (its errors are the caller's to report);
        ``what`` and ``contents``: the file and what it holds, as logs name them ("API key
        file", "keys"); ``loaded``: what the log line of a re-read says of its value;
        ``gone_is_read``: a file that is gone is read as any change is (its source's ``load``
        says what no file means: the limits file's, no override), where by default the value
        read last stays (a key file that is gone is an error)."""
        if not 0.0 <= poll_s <= 1.0:
            raise ValueError(f"poll_s must be within [0, 1], got {poll_s}")
        self._source = source
        self._held = _Held(*first)
        self._monotonic = monotonic
        self._poll_s = poll_s
        self._start = start
        self._log = log
        self._what = what
        self._contents = contents
        self._unreadable = unreadable
        self._malformed = malformed
        self._loaded = loaded
        self._gone_is_read = gone_is_read
        self._checked = monotonic()
        # held while the file is read or written (in worker threads), never by ``current``
        self._lock = threading.Lock()
        # guards the two flags below; held for no I/O
        self._flags = threading.Lock()
        self._reading = False  # a re-read is started or running
        self._again = False  # a poll saw a change while it ran: one more after it
        self._read_started = 0.0  # ``monotonic`` when the running re-read started
        self._stuck_told = False  # the running re-read's WARNING (past the wait) is logged
        # ``fresh`` callers waiting for the re-reads to end: their loops and futures
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def current(self) -> T:
        """The value read last; never waits for the file (at most one ``stat``)."""
        self._poll()
        return self._held.value

    def held(self) -> T:
        """The value read last, without looking at the file."""
        return self._held.value

    async def fresh(self, wait_s: float | None = None) -> T:
        """``current()``, but when a re-read is running (this poll saw a change, or an
        earlier one did), the value it reads: waited for on the event loop until that re-read's
        start plus ``wait_s`` (None: ``FRESH_WAIT_S``), never longer (then, or when it fails,
        the value read last). A re-read still running past that (hung) is not waited for again:
        one WARNING names the file."""
        wait_s = FRESH_WAIT_S if wait_s is None else wait_s
        self._poll()
        if not self._reading:  # (read unlocked: the common case, every request, allocates nothing)
            return self._held.value
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        with self._flags:
            if not self._reading:
                return self._held.value
            left = self._read_started + wait_s - self._monotonic()
            if left > 0:
                self._waiters.append((loop, done))
        if left <= 0:
            self._tell_stuck(wait_s)
            return self._held.value
        waited_out = False
        try:
            async with asyncio.timeout(left):
                await done
        except TimeoutError:
            waited_out = True  # the re-read is past the wait
        finally:
            with self._flags:
                if (loop, done) in self._waiters:
                    self._waiters.remove((loop, done))
        if waited_out:
            self._tell_stuck(wait_s)
        return self._held.value

    def write(self, change: Callable[[T], tuple[T, Signature | None]]) -> T:
        """``change`` (this process's write of the file, in a worker thread) under the lock
        re-reads take too; what it returns is shown at once."""
        with self._lock:
            value, signature = change(self._held.value)
            self._held = _Held(value, signature)
            self._checked = self._monotonic()
            return value

    # --- inside -----------------------------------------------------------------------------
    def _poll(self) -> None:
        now = self._monotonic()
        if now - self._checked < self._poll_s:
            return
        self._checked = now
        signature = self._signature()
        if signature is _Unchecked.UNCHECKED or signature == self._held.signature:
            return
        with self._flags:
            if self._reading:
                self._again = True
                return
            self._reading = True
            self._read_started, self._stuck_told = now, False
        try:
            self._start(self._rereads)
        except RuntimeError as exc:  # can't start new thread: the next poll tries again
            with self._flags:
                self._reading = False
            self._log.error(
                "%s %s: no thread to re-read it (%s); keeping the %s read last",
                self._what,
                self._source.path,
                exc,
                self._contents,
            )

    def _tell_stuck(self, wait_s: float) -> None:
        """One WARNING per re-read that runs past the time ``fresh`` waits for it."""
        with self._flags:
            if self._stuck_told or not self._reading:
                return
            self._stuck_told = True
            ran = self._monotonic() - self._read_started
        self._log.warning(
            "%s %s: a re-read has run %.1f s and not ended (a FIFO or a hung mount in its "
            "place?); requests no longer wait for it (they waited at most %.1f s) and are "
            "answered by the %s read last until it ends",
            self._what,
            self._source.path,
            ran,
            wait_s,
            self._contents,
        )

    def _signature(self) -> Signature | _Unchecked | None:
        """The file's signature, None when it is gone."""
        try:
            return self._source.signature()
        except OSError as exc:  # EACCES, ESTALE on a shared volume: it may pass
            self._log.error(
                "%s %s cannot be checked (%s); keeping the %s read last, checking again",
                self._what,
                self._source.path,
                exc.strerror or type(exc).__name__,
                self._contents,
            )
            return _Unchecked.UNCHECKED

    def _rereads(self) -> None:
        """The worker thread's job: re-reads until no poll saw a change while one ran."""
        again = True
        while again:
            try:
                with self._lock:
                    self._reread()
            except Exception:  # a fault of the source's: the next poll starts another
                self._log.exception(
                    "%s %s could not be re-read; keeping the %s read last",
                    self._what,
                    self._source.path,
                    self._contents,
                )
            with self._flags:
                again, self._again = self._again, False
                self._reading = again
                if again:  # another re-read: its own wait
                    self._read_started, self._stuck_told = self._monotonic(), False
                waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
                if not again:  # the re-reads are over: their waiters are told
                    waiters, self._waiters = self._waiters, []
            for loop, done in waiters:
                _wake(loop, done)

    def _reread(self) -> None:
        """Under the lock, in a worker thread: the file as it is now, if it changed."""
        noun = self._contents
        signature = self._signature()
        held = self._held
        if signature is _Unchecked.UNCHECKED or signature == held.signature:
            return
        if signature is None and not self._gone_is_read:
            self._log.error(
                "%s %s is gone: keeping the %s read last", self._what, self._source.path, noun
            )
            self._held = _Held(held.value, None)
            return
        try:
            value, read = self._source.load(held.value)
        except self._unreadable as exc:  # it may pass: read it again at the next poll
            self._log.error("%s; keeping the %s read last, reading again", exc, noun)
            return
        except self._malformed as exc:
            self._log.error("%s; keeping the %s read last until it is fixed", exc, noun)
            self._held = _Held(held.value, signature)
            return
        self._held = _Held(value, read)
        if said := self._loaded(value):
            self._log.info("%s", said)


def _wake(loop: asyncio.AbstractEventLoop, done: asyncio.Future[None]) -> None:
    """Tells a ``fresh`` caller on ``loop`` (from the re-read's thread) that it is over."""

    def told() -> None:
        if not done.done():
            done.set_result(None)

    with contextlib.suppress(RuntimeError):  # its loop closed: no one waits
        loop.call_soon_threadsafe(told)
