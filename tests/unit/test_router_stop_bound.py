"""The router's stop waits for its cancelled tasks a bounded time (``cancel_within``): the
billing outbox's replay loop, the limits' settles and their replay, the L1 Stores. One that
takes its cancel and keeps running is abandoned, named in an ERROR line, and the stop ends;
waiting for it with no bound held the stop forever, past the supervisor's SIGKILL (and with it
the outbox's last flush, the limits' last settles, the spans still queued)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest

from cachemesh import build_request
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import semantic_cache_pb2 as sc
from services.common.auth import hash_key
from services.common.clock import ManualClock
from services.router.app import serve
from services.router.limit_policy import LimitPolicy, UniformPolicies
from services.router.limit_settles import PendingSettles
from services.router.limits import Limiter
from services.router.memory_limits import MemoryLimitStore
from services.router.outbox import BillingOutbox
from services.tools.stack.ports import free_port
from tests.unit.test_prefix_cache_stop_bound import Stubborn
from tests.unit.test_router_pipeline import FakeSemantic, Rig

START_MS = 1_700_000_000_000
POLICY = LimitPolicy(day_budget_nanos=10**12)


async def _ends(call: Awaitable[None], what: str) -> None:
    """``call`` ends within 30 s (waited for without a cancel: a stubborn task takes that too,
    and ``wait_for`` would then hang on it)."""
    task = asyncio.ensure_future(call)
    done, _ = await asyncio.wait({task}, timeout=30)
    assert task in done, f"{what} did not end"
    task.result()


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def test_the_router_stops_though_its_outbox_replay_ignores_the_cancel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: ``stop_replays`` gathered the replay loop with no bound; the stop never ended."""
    stubborn = Stubborn()
    monkeypatch.setattr(BillingOutbox, "run", lambda self: stubborn.run())
    keys = tmp_path / "api-keys"
    keys.write_text(f"tenant-a:{hash_key('k' * 32)}\n")
    environ = {
        "MODEL_REPLICAS": f"sim-small=127.0.0.1:{free_port()},sim-large=127.0.0.1:{free_port()}",
        "SEMANTIC_CACHE_ADDR": f"127.0.0.1:{free_port()}",  # none there: never called
        "PREFIX_CACHE_ADDR": f"127.0.0.1:{free_port()}",
        "CACHEMESH_INTERNAL_TOKEN": "t" * 32,
        "CACHEMESH_API_KEYS_FILE": str(keys),
        "ROUTER_LISTEN": "127.0.0.1:0",
        "ROUTER_METRICS_LISTEN": "127.0.0.1:0",
        "CACHEMESH_GRACE_S": "0",
        "OTEL_SDK_DISABLED": "true",
    }
    stop = asyncio.Event()
    serving = asyncio.ensure_future(serve(environ, stop))
    try:
        for _ in range(1200):
            if any(r.getMessage() == "router SERVING" for r in caplog.records):
                break
            assert not serving.done(), serving.result()
            await asyncio.sleep(0.05)
        stop.set()
        done, _ = await asyncio.wait({serving}, timeout=30)  # no cancel: it would be taken too
        assert serving in done, "the router's stop did not end"
        serving.result()
        assert stubborn.cancels >= 1
        assert any("billing-outbox-replay" in line for line in _errors(caplog))
        assert any(r.getMessage() == "router stopped" for r in caplog.records)
    finally:
        stubborn.release()
        await asyncio.wait({serving}, timeout=30)


def _no_tokens(request: pb.CompleteRequest) -> int:
    return 0


class FailingStore(MemoryLimitStore):
    """Every settle fails: each is queued for the replay."""

    async def settle(self, *args: Any, **kwargs: Any) -> None:
        raise ConnectionError("the limits' Redis is down")


class StubbornStore(MemoryLimitStore):
    """A settle that takes every cancel (its timeout's, the stop's) and goes on, until
    ``release``."""

    def __init__(self) -> None:
        super().__init__()
        self.stubborn = Stubborn()

    async def settle(self, *args: Any, **kwargs: Any) -> None:
        await self.stubborn.run()


async def test_the_limiters_close_ends_though_its_replay_ignores_the_cancel(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: ``Limiter.close`` gathered its cancelled replay with no bound."""
    stubborn = Stubborn()
    monkeypatch.setattr(PendingSettles, "_replay", lambda self: stubborn.run())
    limiter = Limiter(FailingStore(), UniformPolicies(POLICY), ManualClock(START_MS), _no_tokens)
    limiter.count_unticketed("t", 1_000)
    await limiter.drain()
    assert limiter.pending == 1  # its replay is running
    try:
        await _ends(limiter.close(), "the limiter's close")
        assert stubborn.cancels == 1
        assert any("limits-settle-replay" in line for line in _errors(caplog))
    finally:
        stubborn.release()


async def test_the_limiters_drain_ends_though_a_settle_ignores_its_cancel(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A settle whose store call takes its timeout's cancel and goes on. Before: ``drain``
    (the router's stop, then ``close``) gathered it with no bound."""
    store = StubbornStore()
    lost: list[int] = []
    limiter = Limiter(
        store,
        UniformPolicies(POLICY),
        ManualClock(START_MS),
        _no_tokens,
        timeout_s=0.01,
        lost=lost.append,
    )
    limiter.count_unticketed("t", 1_000)
    try:
        await _ends(limiter.drain(), "the limiter's drain")
        assert store.stubborn.cancels >= 1 and lost == [1]
        assert any("limits-settle-" in line for line in _errors(caplog))
        closing = asyncio.ensure_future(limiter.close())  # the abandoned settle not waited again
        await _ends(closing, "the limiter's close")
    finally:
        store.stubborn.release()
        await asyncio.sleep(0)


class StubbornStores(FakeSemantic):
    """A semantic-cache whose Store never answers, and whose call takes its cancel and goes
    on, until ``release``."""

    def __init__(self) -> None:
        super().__init__()
        self.stubborn = Stubborn()

    async def store(self, request: sc.StoreRequest, deadline_s: float) -> sc.StoreResponse:
        await self.stubborn.run()
        return sc.StoreResponse()


async def test_the_stores_end_though_one_ignores_its_cancel(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before: ``end_stores`` gathered the Stores it cancelled with no bound."""
    semantic = StubbornStores()
    pipeline = Rig(semantic=semantic).pipeline()
    answered = pipeline.run("tenant-a", build_request("What is a tide?", model="sim-large"))
    assert [c async for c in answered][-1].WhichOneof("part") == "end"  # its Store hangs
    try:
        await _ends(pipeline.end_stores(0.01), "end_stores")
        assert semantic.stubborn.cancels == 1
        assert any("semantic Stores" in line for line in _errors(caplog))
    finally:
        semantic.stubborn.release()
        await asyncio.wait_for(pipeline.drain(), 30)
