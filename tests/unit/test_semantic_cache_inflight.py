"""A check waits for its scope's Stores in flight at its start, and only for those."""

from __future__ import annotations

import asyncio
import contextlib

from services.semantic_cache.inflight import StoresInFlight

KEY = ("acme", "scope-1")


async def _turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_a_check_is_not_held_by_stores_that_began_after_it() -> None:
    # in a busy scope Stores overlap without end: the check waits for the one open at its
    # start, not for every later one (one shared event held it for its whole timeout)
    inflight = StoresInFlight()
    with contextlib.ExitStack() as first:
        first.enter_context(inflight.storing(KEY))
        check = asyncio.create_task(inflight.settled(KEY, timeout_s=3600))
        await _turns()
        with inflight.storing(KEY):  # begins while the check waits
            await _turns()
            assert not check.done()
            first.close()  # the Store open at the check's start ends
            await _turns()
            assert check.done()
    await check


async def test_a_check_waits_for_every_store_open_at_its_start() -> None:
    inflight = StoresInFlight()
    with contextlib.ExitStack() as a, contextlib.ExitStack() as b:
        a.enter_context(inflight.storing(KEY))
        b.enter_context(inflight.storing(KEY))
        check = asyncio.create_task(inflight.settled(KEY, timeout_s=3600))
        await _turns()
        a.close()
        await _turns()
        assert not check.done()
        b.close()
        await _turns()
        assert check.done()


async def test_other_scopes_and_an_idle_scope_never_delay_a_check() -> None:
    inflight = StoresInFlight()
    with inflight.storing(("acme", "other")), inflight.storing(("globex", "scope-1")):
        check = asyncio.create_task(inflight.settled(KEY, timeout_s=3600))
        await _turns(1)
        assert check.done()


async def test_a_check_gives_up_after_its_timeout_and_the_store_still_ends_cleanly() -> None:
    inflight = StoresInFlight()
    with inflight.storing(KEY):
        await inflight.settled(KEY, timeout_s=0)
    assert not inflight._open  # nothing left behind for the scope
