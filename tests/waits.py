"""A bounded wait for a test's event (a fake's ``arrived``, ``started``, ``called``...).

``await event.wait()`` has no end: a regression that never sets the event hung its test until
the 600 s faulthandler dump (and CI's limit), with no word of what it waited for. ``reached``
waits at most ``timeout_s``, far above any wait of a passing test (a bound, never a measure),
and then fails naming the event."""

from __future__ import annotations

import asyncio

REACHED_S = 30.0


async def reached(event: asyncio.Event, what: str, timeout_s: float = REACHED_S) -> None:
    """Returns once ``event`` is set; an AssertionError naming ``what`` if it is not within
    ``timeout_s``."""
    try:
        await asyncio.wait_for(event.wait(), timeout_s)
    except TimeoutError:
        raise AssertionError(f"{what}: not set within {timeout_s:g} s") from None
