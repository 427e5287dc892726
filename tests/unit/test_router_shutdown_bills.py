"""At shutdown every bill of a call cut short is sent or kept: the pipeline's drain awaits the
bills scheduled while it waits (a handler gRPC cancelled at the end of the grace unwinds after
the drain began), and an outbox in memory that still holds a bill at its last flush logs it at
ERROR with its cost (it is lost with the process)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import pytest

from cachemesh import build_request
from cachemesh.v1 import prefix_cache_pb2 as pc
from cachemesh.v1 import semantic_cache_pb2 as sc
from services.router.outbox import BillingOutbox
from services.router.pipeline import Pipeline
from tests.unit.test_router_outbox import FakePrefix as DownPrefix
from tests.unit.test_router_outbox import _commits
from tests.unit.test_router_pipeline import FakePrefix, FakeSemantic, Rig


@dataclass
class HeldWarms(FakePrefix):
    """A prefix-cache whose WARM commit of each request waits until the test lets it answer."""

    answer: dict[str, asyncio.Event] = field(default_factory=dict)

    async def commit(self, request: pc.CommitRequest, deadline_s: float) -> pc.CommitResponse:
        if request.phase == pc.COMMIT_PHASE_WARM:
            await self.answer.setdefault(request.tenant, asyncio.Event()).wait()
        return await super().commit(request, deadline_s)


async def _left_early(pipeline: Pipeline, tenant: str) -> None:
    """A call whose caller leaves while its WARM commit is out: its bill is scheduled."""
    run = pipeline.run(tenant, build_request("Explain the tides.", model="sim-large"))
    first = asyncio.ensure_future(run.__anext__())
    await asyncio.sleep(0.01)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_the_drain_awaits_the_bills_scheduled_while_it_waits() -> None:
    prefix = HeldWarms()
    rig = Rig(prefix=prefix)
    pipeline = rig.pipeline()
    await _left_early(pipeline, "tenant-a")
    drain = asyncio.ensure_future(pipeline.drain())
    await asyncio.sleep(0.01)
    await _left_early(pipeline, "tenant-b")  # a handler cut after the drain began
    prefix.answer["tenant-a"].set()

    def finals() -> list[str]:
        return [c.tenant for c in prefix.commits if c.phase == pc.COMMIT_PHASE_FINAL]

    for _ in range(500):  # its bill's FINAL goes a few loop turns (and threads) later
        if finals():
            break
        await asyncio.sleep(0.01)
    assert finals() == ["tenant-a"]
    assert not drain.done()  # tenant-b's bill is still to come
    prefix.answer["tenant-b"].set()
    await asyncio.wait_for(drain, 10)
    assert finals() == ["tenant-a", "tenant-b"]


async def test_a_bill_an_outbox_in_memory_still_holds_at_shutdown_is_logged_with_its_cost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    outbox = BillingOutbox(DownPrefix(), None, 1.0, 0.01)  # prefix-cache down, no journal
    await outbox.keep(_commits("a#1"), 4_200)
    with caplog.at_level(logging.ERROR, logger="cachemesh.router.outbox"):
        await outbox.close()
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "a#1" in line and "tenant t" in line and "cost_nanos=4200" in line
    assert "lost" in line and "ROUTER_DATA_DIR" in line


class HangingStores(FakeSemantic):
    """A semantic-cache whose Store never answers (its WAL fsync stuck): each would run to its
    10 s deadline."""

    async def store(self, request: sc.StoreRequest, deadline_s: float) -> sc.StoreResponse:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_shutdown_sends_the_bills_first_and_cuts_the_stores_short(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The bills do not wait behind an L1 Store (each up to its 10 s deadline, past the stack's
    SIGKILL); a Store still pending after its short bound is cancelled and counted in a log
    line: it costs only a future hit."""
    prefix = HeldWarms()
    rig = Rig(semantic=HangingStores(), prefix=prefix)
    pipeline = rig.pipeline()
    prefix.answer["tenant-a"] = asyncio.Event()
    prefix.answer["tenant-a"].set()
    answered = pipeline.run("tenant-a", build_request("What is a tide?", model="sim-large"))
    assert [c async for c in answered][-1].WhichOneof("part") == "end"  # its Store hangs
    await _left_early(pipeline, "tenant-b")  # a bill, its WARM held
    bills = asyncio.ensure_future(pipeline.drain_bills())
    await asyncio.sleep(0.01)
    assert not bills.done()
    prefix.answer["tenant-b"].set()
    await asyncio.wait_for(bills, 5)  # the bill is sent; the hanging Store is not awaited
    finals = [c.tenant for c in prefix.commits if c.phase == pc.COMMIT_PHASE_FINAL]
    assert finals == ["tenant-a", "tenant-b"]
    with caplog.at_level(logging.WARNING, logger="cachemesh.router"):
        await asyncio.wait_for(pipeline.end_stores(0.05), 5)
    assert any("1 semantic Store" in r.getMessage() for r in caplog.records)
    await asyncio.wait_for(pipeline.drain(), 5)  # nothing left running
