"""A one-line progress bar on stderr, redrawn at most ten times a second.

It draws only on a terminal: when its stream is a file or a pipe (logs, CI) it writes nothing
while the run goes and one plain line when it closes, so logs carry no carriage returns.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

_WIDTH = 30


class Progress:
    def __init__(
        self,
        label: str,
        total: int,
        out: TextIO | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._label, self._total = label, max(1, total)
        self._out = out or sys.stderr
        self._interactive = self._out.isatty()
        self._clock = clock
        self._started = clock()
        self._drawn = float("-inf")
        self._done = 0

    def __call__(self, done: int) -> None:
        self._done = done
        if not self._interactive:
            return
        now = self._clock()
        if now - self._drawn < 0.1 and done < self._total:
            return
        self._drawn = now
        filled = min(_WIDTH, _WIDTH * done // self._total)
        self._out.write(f"\r{self._label} [{'#' * filled}{'.' * (_WIDTH - filled)}] {self._tail()}")
        self._out.flush()

    def close(self) -> None:
        if self._interactive:
            self._out.write("\n")
        else:
            self._out.write(f"{self._label}: {self._tail()}\n")
        self._out.flush()

    def _tail(self) -> str:
        elapsed = self._clock() - self._started
        rate = self._done / elapsed if elapsed > 0 else 0.0
        return f"{self._done}/{self._total} {elapsed:6.1f} s {rate:7.1f} req/s"
