"""The replica's tenant-fair queue (``services.model.fair_queue``): the order it admits calls
in, driven by hand (acquire, release), no time passing but the injected clock's."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from services.model.fair_queue import MIN_COST, FairQueue


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Watcher:
    def __init__(self) -> None:
        self.levels: Counter[str] = Counter()

    def waiting(self, tenant: str, change: int) -> None:
        self.levels[tenant] += change


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)  # lets the tasks run up to their next wait; no time passes


class Driver:
    """Calls queued by hand; ``serve`` releases the running one and records who is next."""

    def __init__(self, queue: FairQueue) -> None:
        self.queue = queue
        self.order: list[str] = []
        self.tasks: dict[str, asyncio.Task[object]] = {}

    async def submit(self, name: str, tenant: str, cost: int) -> None:
        async def call() -> object:
            admission = await self.queue.acquire(tenant, cost)
            self.order.append(name)
            return admission

        self.tasks[name] = asyncio.ensure_future(call())
        await _settle()

    async def serve(self, count: int) -> list[str]:
        """Releases ``count`` running calls one at a time; the calls admitted, in order."""
        start = len(self.order)
        for _ in range(count):
            self.queue.release()
            await _settle()
        return self.order[start:]


async def _busy(queue: FairQueue, clock: Clock | None = None) -> Driver:
    driver = Driver(queue)
    await driver.submit("running", "x", 100)  # holds the one place
    assert driver.order == ["running"]
    return driver


async def test_one_tenant_is_first_come_first_served() -> None:
    driver = await _busy(FairQueue(1, Clock()))
    for n, cost in enumerate((5000, 10, 900, 16, 3000)):
        await driver.submit(f"b{n}", "b", cost)
    assert await driver.serve(5) == ["b0", "b1", "b2", "b3", "b4"]


async def test_a_light_tenant_waits_behind_the_running_call_not_the_backlog() -> None:
    driver = await _busy(FairQueue(1, Clock()))
    for n in range(20):
        await driver.submit(f"b{n}", "b", 1500)  # a flood of ~1,200-word prompts
    await driver.submit("a0", "a", 40)
    assert await driver.serve(1) == ["a0"]  # next, ahead of b0 (b needs 6 turns of 256)
    await driver.submit("a1", "a", 40)  # sent while a0 runs: a is still the lighter
    assert await driver.serve(2) == ["a1", "b0"]


async def test_backlogged_tenants_share_the_engine_by_tokens() -> None:
    driver = await _busy(FairQueue(1, Clock()))
    for n in range(30):
        await driver.submit(f"b{n}", "b", 1500)
        await driver.submit(f"a{n}", "a", 500)
    served = await driver.serve(24)
    a = [s for s in served if s.startswith("a")]
    b = [s for s in served if s.startswith("b")]
    assert abs(500 * len(a) - 1500 * len(b)) <= 1500  # equal shares of tokens, within a call
    assert a == [f"a{n}" for n in range(len(a))]  # each tenant's calls in their own order
    assert b == [f"b{n}" for n in range(len(b))]


async def test_three_tenants_take_turns_and_a_newcomer_joins_the_round_last() -> None:
    driver = await _busy(FairQueue(1, Clock(), quantum=100))
    for n in range(3):
        await driver.submit(f"a{n}", "a", 100)
        await driver.submit(f"b{n}", "b", 100)
    await driver.submit("c0", "c", 100)
    assert await driver.serve(7) == ["a0", "b0", "c0", "a1", "b1", "a2", "b2"]


async def test_a_large_quantum_lets_a_turn_run_several_calls() -> None:
    driver = await _busy(FairQueue(1, Clock(), quantum=300))
    for n in range(3):
        await driver.submit(f"b{n}", "b", 100)
    await driver.submit("a0", "a", 100)
    assert await driver.serve(4) == ["b0", "b1", "b2", "a0"]


async def test_a_cancelled_waiting_call_leaves_at_once_and_moves_no_one() -> None:
    watcher = Watcher()
    queue = FairQueue(1, Clock(), quantum=100, watcher=watcher)
    driver = await _busy(queue)
    for name, tenant in (("b0", "b"), ("a0", "a"), ("b1", "b"), ("a1", "a")):
        await driver.submit(name, tenant, 100)
    assert watcher.levels == {"a": 2, "b": 2}
    driver.tasks["a0"].cancel()  # its caller left (or its deadline passed)
    await _settle()
    assert queue.waiting == 3 and watcher.levels == {"a": 1, "b": 2}
    assert await driver.serve(3) == ["b0", "a1", "b1"]
    assert watcher.levels == {"a": 0, "b": 0}
    with pytest.raises(asyncio.CancelledError):
        await driver.tasks["a0"]


async def test_a_call_cancelled_as_it_is_admitted_hands_its_place_on() -> None:
    queue = FairQueue(1, Clock())
    driver = await _busy(queue)
    await driver.submit("a0", "a", 100)
    await driver.submit("b0", "b", 100)
    queue.release()  # a0 is admitted ...
    driver.tasks["a0"].cancel()  # ... and cancelled before it ran
    await _settle()
    assert driver.order == ["running", "b0"]
    assert queue.running == 1 and queue.waiting == 0


async def test_a_waiting_call_cancelled_as_another_is_released_takes_no_place() -> None:
    """The caller of a waiting call leaves (its task cancelled: its future at once, its except
    only at the task's next step) and, in the same turn, the running call ends: the release
    must not admit the cancelled call. Before, it did: ``set_result`` on the cancelled future
    raised InvalidStateError out of the finished call's release, and the place stayed counted
    as running for good (a one-place simulator never answered again)."""
    queue = FairQueue(1, Clock())
    driver = await _busy(queue)
    await driver.submit("b0", "b", 100)
    await driver.submit("c0", "c", 100)
    driver.tasks["b0"].cancel()  # its deadline passes ...
    queue.release()  # ... as the running call ends, before b0's task runs again
    await _settle()
    assert driver.order == ["running", "c0"]
    assert queue.running == 1 and queue.waiting == 0
    with pytest.raises(asyncio.CancelledError):
        await driver.tasks["b0"]
    queue.release()  # c0 ends: the place is free again, none lost
    assert queue.running == 0


async def test_the_wait_is_measured_on_the_injected_clock() -> None:
    clock = Clock()
    queue = FairQueue(2, clock)
    first = await queue.acquire("a", 100)
    assert (first.waited_s, first.ahead) == (0.0, 0)
    await queue.acquire("a", 100)
    waiter = asyncio.ensure_future(queue.acquire("b", 100))
    await _settle()
    clock.now = 2.5
    queue.release()
    admission = await waiter
    assert (admission.waited_s, admission.ahead) == (2.5, 2)


async def test_costs_below_the_floor_count_as_the_floor() -> None:
    # a prompt the KV cache holds whole still costs a call: b's many free calls do not run
    # ahead of a's for a whole quantum
    driver = await _busy(FairQueue(1, Clock(), quantum=MIN_COST))
    for n in range(3):
        await driver.submit(f"b{n}", "b", 0)
    await driver.submit("a0", "a", 0)
    assert await driver.serve(4) == ["b0", "a0", "b1", "b2"]


async def test_capacity_admits_that_many_at_once() -> None:
    queue = FairQueue(3, Clock())
    for _ in range(3):
        await queue.acquire("b", 1000)
    assert queue.running == 3
    waiter = asyncio.ensure_future(queue.acquire("a", 10))
    await _settle()
    assert not waiter.done() and queue.waiting == 1
    queue.release()
    await waiter
    assert queue.running == 3


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="capacity must be > 0"):
        FairQueue(0, Clock())
    with pytest.raises(ValueError, match="quantum must be > 0"):
        FairQueue(1, Clock(), quantum=0)
