"""A one-line progress bar on stderr, redrawn at most ten times a second."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, label: str, total: int, out: TextIO | None = None) -> None:
        self._label, self._total = label, max(1, total)
        self._out = out or sys.stderr
        self._started = time.monotonic()
        self._drawn = 0.0

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if now - self._drawn < 0.1 and done < self._total:
            return
        self._drawn = now
        filled = min(30, 30 * done // self._total)
        elapsed = now - self._started
        rate = done / elapsed if elapsed > 0 else 0.0
        self._out.write(
            f"\r{self._label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{self._total} "
            f"{elapsed:6.1f} s {rate:7.1f} req/s"
        )
        self._out.flush()

    def close(self) -> None:
        self._out.write("\n")
        self._out.flush()
