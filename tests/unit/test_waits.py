"""``tests.waits.reached``: an event a regression never sets fails its test, naming it, where
a bare ``await event.wait()`` hung the test until the faulthandler dump."""

from __future__ import annotations

import asyncio

import pytest

from tests.waits import reached


async def test_an_event_never_set_fails_naming_it() -> None:
    with pytest.raises(AssertionError, match=r"^fake\.arrived: not set within 0\.05 s$"):
        await reached(asyncio.Event(), "fake.arrived", timeout_s=0.05)


async def test_an_event_set_returns() -> None:
    event = asyncio.Event()
    asyncio.get_running_loop().call_soon(event.set)
    await reached(event, "set soon")
    assert event.is_set()
