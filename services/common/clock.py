"""Time as an injected seam, so TTL logic is tested without sleeping."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol


class Clock(Protocol):
    def now_ms(self) -> int:
        """Wall-clock time in milliseconds since the epoch (a ``MonotonicClock``: since an
        arbitrary instant, for ages within this process)."""
        ...


class SystemClock:
    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


class MonotonicClock:
    """Milliseconds that never step (not a time of day): for the age of what lives in this
    process only (a lease), which a step of the wall clock (NTP, a VM resumed) must neither
    stretch nor cut."""

    def now_ms(self) -> int:
        return time.monotonic_ns() // 1_000_000


class ManualClock:
    """A clock that moves only when told to (for tests and replays)."""

    def __init__(self, start_ms: int = 1_700_000_000_000) -> None:
        self._now_ms = start_ms

    def now_ms(self) -> int:
        return self._now_ms

    def advance(self, *, ms: int = 0, s: float = 0.0) -> None:
        self._now_ms += ms + round(s * 1000)


class Throttle:
    """For a repeated event logged at most once an interval (a flood of identical lines
    otherwise): ``due`` counts events and, when the interval since the last line has passed
    (or ``force``), returns how many came since, this one included; else 0."""

    def __init__(self, clock: Clock, interval_ms: int) -> None:
        self._clock = clock
        self._interval_ms = interval_ms
        self._last_ms: int | None = None
        self._pending = 0

    def due(self, count: int = 1, *, force: bool = False) -> int:
        self._pending += count
        now = self._clock.now_ms()
        if not force and self._last_ms is not None and now - self._last_ms < self._interval_ms:
            return 0
        pending, self._pending = self._pending, 0
        self._last_ms = now
        return pending

    def clear_pending(self) -> None:
        """Forgets the events not yet counted by a line (another line counted them), leaving
        the interval as it is."""
        self._pending = 0


class SecondsClock:
    """A ``Clock`` over a clock of seconds (``time.monotonic``, a test's fake): for a piece
    timed in seconds that logs through a ``Throttle``."""

    def __init__(self, seconds: Callable[[], float]) -> None:
        self._seconds = seconds

    def now_ms(self) -> int:
        return round(self._seconds() * 1000)


class Throttles:
    """A ``Throttle`` for each key and kind, for a failure that comes once a request while a
    dependency is down (a flood of lines otherwise): the key names the dependency (with its
    operation where the line names it), the kind what failed (a status code). The first
    failure of a key and kind is logged at once, a new kind too (DEADLINE_EXCEEDED, then
    UNAVAILABLE), then at most one line an interval for each, saying how many were not logged
    (``suppressed``); a dependency that flaps between two codes makes two lines an interval,
    not one a request. The keys are few and fixed (names of dependencies, operations, replicas
    and codes; never a tenant's or a request's)."""

    def __init__(self, clock: Clock, interval_ms: int) -> None:
        self._clock = clock
        self.interval_ms = interval_ms
        self._throttles: dict[tuple[str, str], Throttle] = {}

    def due(self, key: str, kind: str = "") -> int:
        """Counts a failure of ``key`` and ``kind``: how many came since the last line of
        both, this one included, when it is to be logged now; else 0."""
        throttle = self._throttles.get((key, kind))
        if throttle is None:
            throttle = self._throttles[key, kind] = Throttle(self._clock, self.interval_ms)
        return throttle.due()


def suppressed(due: int, interval_ms: int) -> str:
    """What a throttled line adds when ``due`` (``Throttles.due``) counts more than itself."""
    if due <= 1:
        return ""
    every = f"{interval_ms / 1000:g}"
    return f" ({due - 1} more since the last such line, not logged: one line a {every} s)"
