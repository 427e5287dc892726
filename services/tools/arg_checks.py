"""Bounds of the benches' numeric flags, checked before anything starts: ``--requests 0``
was a TypeError traceback after hit_cpu had started its stack, ``--prompts 0`` a
ZeroDivisionError, and ``--time-scale nan`` printed measured speed-ups of nothing (exit 0)."""

from __future__ import annotations

import argparse
import math


def at_least(parser: argparse.ArgumentParser, minimum: int, **flags: int) -> None:
    """The parser's error (exit 2) for the first of ``flags`` (``name=value``, the flag
    ``--name-with-dashes``) below ``minimum``."""
    for name, value in flags.items():
        if value < minimum:
            parser.error(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")


def finite_over(parser: argparse.ArgumentParser, low: float, **flags: float) -> None:
    """The parser's error for the first of ``flags`` that is not a finite number over ``low``."""
    for name, value in flags.items():
        if not (math.isfinite(value) and value > low):
            parser.error(
                f"--{name.replace('_', '-')} must be a finite number > {low:g}, got {value}"
            )


def within(parser: argparse.ArgumentParser, low: float, high: float, **flags: float) -> None:
    """The parser's error for the first of ``flags`` that is not a finite number from ``low``
    to ``high``, both included (``--time-scale 0`` is a valid scale: no sleeps)."""
    for name, value in flags.items():
        if not (math.isfinite(value) and low <= value <= high):
            parser.error(
                f"--{name.replace('_', '-')} must be a finite number from {low:g} to {high:g}, "
                f"got {value}"
            )
