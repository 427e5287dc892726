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
        self._drawn_done = -1  # the count the bar shows

    def __call__(self, done: int) -> None:
        self._done = done
        if not self._interactive:
            return
        now = self._clock()
        if now - self._drawn < 0.1 and done < self._total:
            return
        self._drawn = now
        self._draw()
        self._out.flush()

    def _draw(self, why: str = "") -> None:
        self._drawn_done = self._done
        filled = min(_WIDTH, _WIDTH * self._done // self._total)
        bar = f"[{'#' * filled}{'.' * (_WIDTH - filled)}]"
        self._out.write(f"\r{self._label} {bar} {self._tail()}{why}")

    @property
    def elapsed_s(self) -> float:
        return self._clock() - self._started

    def close(self, short: str = "") -> None:
        """The last line: the bar drawn once more with the final count and time when it
        shows an earlier one (a redraw held back by the 0.1 s limit), and, for a run that ended
        before ``total`` (``--duration``, Ctrl-C), ``short``: why, so the bar that never
        filled is not read as a run still going or one that crashed."""
        why = f" -- {short}" if short and self._done < self._total else ""
        if self._interactive:
            if why or self._drawn_done != self._done:
                self._draw(why)
            self._out.write("\n")
        else:
            self._out.write(f"{self._label}: {self._tail()}{why}\n")
        self._out.flush()

    def _tail(self) -> str:
        elapsed = self.elapsed_s
        rate = self._done / elapsed if elapsed > 0 else 0.0
        return f"{self._done}/{self._total} {elapsed:6.1f} s {rate:7.1f} req/s"
