"""One tenant's slow Lookups leave L1 alone for that tenant, not for the others.

The router had one breaker over semantic-cache's Lookups: any tenant's first Lookups that timed
out in a row left L1 alone for every tenant. A tenant keeping 200 requests in flight timed its
own Lookups out behind its own backlog in L1's embedder (fair per tenant: another tenant's
Lookups took 2-3 ms meanwhile), and for ``ROUTER_SEMANTIC_BREAKER_S`` every tenant skipped L1:
the others' cached repeats went to the model, billed, and their answers were not stored. Now a
timeout counts toward leaving L1 alone for everyone only when no other tenant's Lookup was
answered while it waited; the tenant's own timeouts leave L1 alone for that tenant alone. A
real hang (nothing answered) still leaves L1 alone for every tenant after three.

Time is a fake clock; a Lookup of the slow tenant waits until the test fails it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import pytest

from cachemesh.v1 import semantic_cache_pb2 as sc
from services.common.errors import Code
from services.router.breaker import Dependency
from services.router.calls import Calls
from services.router.dependencies import CallFailed, Dependencies
from services.router.l1_breaker import TENANT_BREAKERS, SemanticBreakers
from services.router.settings import RouterSettings
from tests.unit.test_router_pipeline import (
    REPLICAS,
    TABLE,
    FakeClock,
    FakeModels,
    FakePrefix,
    FakeSemantic,
    _request,
)
from tests.unit.test_router_semantic_hang import _env

SLOW = "tenant-b"
TIMEOUT_S = 2.0  # ROUTER_SEMANTIC_TIMEOUT_S's default: each Lookup waits this long at most


@dataclass
class BackloggedSemantic(FakeSemantic):
    """L1 whose Lookups of ``slow`` tenants wait (behind their own backlog) until the test
    times them out; the others' are answered at once. ``hung``: none is answered."""

    slow: set[str] = field(default_factory=lambda: {SLOW})
    hung: bool = False
    waiting: list[asyncio.Future[sc.LookupResponse]] = field(default_factory=list)

    async def lookup(self, request: sc.LookupRequest, deadline_s: float) -> sc.LookupResponse:
        self.lookups.append(request)
        if self.hung or request.tenant in self.slow:
            waits: asyncio.Future[sc.LookupResponse] = asyncio.get_running_loop().create_future()
            self.waiting.append(waits)
            return await waits
        return sc.LookupResponse()

    def time_out(self) -> None:
        for waits in self.waiting:
            waits.set_exception(CallFailed(Code.DEADLINE_EXCEEDED, "Deadline Exceeded"))
        self.waiting.clear()


@dataclass
class Rig:
    clock: FakeClock = field(default_factory=FakeClock)
    semantic: BackloggedSemantic = field(default_factory=BackloggedSemantic)
    hangs: list[Dependency] = field(default_factory=list)  # breaker_opens_total's steps
    tenant_opens: int = 0  # l1_tenant_breaker_opens_total's steps

    def __post_init__(self) -> None:
        settings = RouterSettings.from_env(_env(ROUTER_SEMANTIC_BREAKER_S="5"), TABLE)
        deps = Dependencies(self.semantic, FakePrefix(), FakeModels(), dict(REPLICAS))
        self.calls = Calls(
            deps,
            settings,
            clock=self.clock,
            hung=self.hangs.append,
            tenant_left_alone=self._tenant_opened,
        )

    def _tenant_opened(self) -> None:
        self.tenant_opens += 1

    def sent(self, tenant: str) -> int:
        return sum(1 for lookup in self.semantic.lookups if lookup.tenant == tenant)

    async def lookup(self, tenant: str) -> sc.LookupResponse | None:
        return await self.calls.lookup(tenant, _request())

    async def slow_lookups(self, tenant: str, n: int, *, answered: str = "") -> None:
        """``n`` Lookups of ``tenant`` in flight together, timed out after ``TIMEOUT_S``;
        ``answered``: a tenant whose Lookup is answered meanwhile."""
        waiting = [asyncio.ensure_future(self.lookup(tenant)) for _ in range(n)]
        await asyncio.sleep(0)  # each is sent
        self.clock.now += 0.003
        if answered:
            assert await self.lookup(answered) is not None
        self.clock.now += TIMEOUT_S
        self.semantic.time_out()
        assert await asyncio.gather(*waiting) == [None] * n


async def test_one_tenants_timeouts_leave_l1_alone_for_that_tenant_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig()
    with caplog.at_level(logging.DEBUG, logger="cachemesh.router"):
        await rig.slow_lookups(SLOW, 3, answered="tenant-a")
        # tenant-a's Lookups are still sent, and answered
        for _ in range(5):
            assert await rig.lookup("tenant-a") is not None
            rig.clock.now += 0.2
    assert rig.sent("tenant-a") == 6
    # tenant-b's are not, for ROUTER_SEMANTIC_BREAKER_S
    assert await rig.lookup(SLOW) is None
    assert rig.sent(SLOW) == 3
    # no hang of semantic-cache counted, one tenant left alone; the log names the tenant
    assert rig.hangs == []
    assert rig.tenant_opens == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(SLOW in line and "ROUTER_SEMANTIC_BREAKER_S" in line for line in warnings)
    assert not any("no L1 hits meanwhile" in line for line in warnings)  # no hang


async def test_a_tenants_trial_after_the_wait_answered_sends_its_lookups_again() -> None:
    rig = Rig()
    await rig.slow_lookups(SLOW, 3, answered="tenant-a")
    rig.clock.now += 5.0
    rig.semantic.slow.clear()
    assert await rig.lookup(SLOW) is not None  # the trial
    assert await rig.lookup(SLOW) is not None
    assert rig.sent(SLOW) == 5


async def test_a_tenants_failed_trial_is_not_counted_again_and_a_new_run_is() -> None:
    rig = Rig()
    await rig.slow_lookups(SLOW, 3, answered="tenant-a")
    rig.clock.now += 5.0
    await rig.slow_lookups(SLOW, 1, answered="tenant-a")  # the trial times out
    assert rig.tenant_opens == 1
    rig.clock.now += 5.0
    rig.semantic.slow.clear()
    assert await rig.lookup(SLOW) is not None  # closed
    rig.semantic.slow.add(SLOW)
    await rig.slow_lookups(SLOW, 3, answered="tenant-a")
    assert rig.tenant_opens == 2


async def test_stores_without_a_lease_are_skipped_for_the_slow_tenant_only() -> None:
    rig = Rig()
    await rig.slow_lookups(SLOW, 3, answered="tenant-a")
    answer = sc.CachedAnswer(model="sim-small")
    assert await rig.calls.store(SLOW, _request(), answer) is None
    assert await rig.calls.store("tenant-a", _request(), answer) is not None
    assert [store.tenant for store in rig.semantic.stores] == ["tenant-a"]


async def test_a_hang_leaves_l1_alone_for_every_tenant_after_three_timeouts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig()
    rig.semantic.hung = True
    with caplog.at_level(logging.WARNING, logger="cachemesh.router"):
        await rig.slow_lookups(SLOW, 3)  # nothing answered while they waited
    assert rig.hangs == ["semantic-cache"]
    assert rig.tenant_opens == 0  # a hang is L1's, not the tenant's
    assert await rig.lookup("tenant-a") is None
    assert await rig.lookup("tenant-c") is None
    assert rig.sent("tenant-a") == rig.sent("tenant-c") == 0
    hangs = [r.getMessage() for r in caplog.records if "in a row timed out" in r.getMessage()]
    assert len(hangs) == 1 and hangs[0].startswith("semantic-cache: 3 Lookups in a row")


async def test_a_hang_across_tenants_is_one_hang() -> None:
    rig = Rig()
    rig.semantic.hung = True
    await rig.slow_lookups(SLOW, 2)
    await rig.slow_lookups("tenant-c", 1)
    assert rig.hangs == ["semantic-cache"]
    assert await rig.lookup("tenant-a") is None
    assert rig.sent("tenant-a") == 0
    # L1 back: one trial answers, and every tenant's Lookups are sent again at once
    rig.semantic.hung = False
    rig.semantic.slow.clear()
    rig.clock.now += 5.0
    assert await rig.lookup("tenant-a") is not None
    assert await rig.lookup(SLOW) is not None
    assert await rig.lookup("tenant-c") is not None


def test_the_tenants_left_alone_are_bounded() -> None:
    clock = FakeClock()
    breakers = SemanticBreakers(5.0, clock)
    breakers.answered("tenant-a")
    for i in range(TENANT_BREAKERS + 10):
        for _ in range(3):
            breakers.failed(f"t{i}", sent=clock.now - 1.0)
    assert breakers.tenants_tracked() == TENANT_BREAKERS
    assert breakers.open(f"t{TENANT_BREAKERS + 9}")
    assert not breakers.open("t0")  # the least recently failed, forgotten: tried again
