"""KeyedLock: one key's holders take turns, other keys go on meanwhile, nothing is kept after."""

from __future__ import annotations

import asyncio

from services.prefix_cache.keyed_lock import KeyedLock


def test_same_key_waits_other_keys_do_not_and_nothing_is_kept() -> None:
    async def run() -> None:
        locks = KeyedLock()
        order: list[str] = []
        release = asyncio.Event()

        async def hold(key: str, name: str, wait: bool) -> None:
            async with locks.hold(key):
                order.append(f"{name} in")
                if wait:
                    await release.wait()
                order.append(f"{name} out")

        first = asyncio.create_task(hold("a", "a1", wait=True))
        await asyncio.sleep(0)
        second = asyncio.create_task(hold("a", "a2", wait=False))
        other = asyncio.create_task(hold("b", "b1", wait=False))
        await other  # not held up by a1, which holds "a"
        await asyncio.sleep(0)
        assert order == ["a1 in", "b1 in", "b1 out"]
        assert len(locks) == 1
        release.set()
        await asyncio.gather(first, second)
        assert order[3:] == ["a1 out", "a2 in", "a2 out"]
        assert len(locks) == 0

    asyncio.run(run())


def test_a_holder_that_fails_releases_its_key() -> None:
    async def run() -> None:
        locks = KeyedLock()
        try:
            async with locks.hold("a"):
                raise RuntimeError("boom")
        except RuntimeError:
            pass
        assert len(locks) == 0
        async with locks.hold("a"):
            assert len(locks) == 1

    asyncio.run(run())
