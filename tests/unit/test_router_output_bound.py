"""A call billed without its answer (its caller left, or the router cut it) is billed the
router's count of what it received, at most the request's ``max_tokens``: a provider stops
there and bills no more. Before, an upstream that ignored max_tokens=50 and wrote 6 MB until
the router's deadline was billed 200,786 output tokens (120,473,400 nanos on gpt-4o-mini,
whose 50 tokens cost 30,000)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from cachemesh import build_request
from cachemesh.v1 import model_pb2
from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.clock import ManualClock
from services.common.metrics import TenantLabels, new_registry
from services.router.metrics import RouterMetrics
from services.router.outbox import BillingOutbox
from services.router.outbox_journal import Journal
from tests.unit.test_router_open_calls import WritingModels, _restarted
from tests.unit.test_router_partial_billing import Held
from tests.unit.test_router_pipeline import (
    FakeClock,
    FakeModels,
    FakePrefix,
    FakeStream,
    Rig,
    _answer,
)
from tests.unit.test_router_unanswered_money import _pipeline

MAX_TOKENS = 20
WORDS = "Paris is the capital of France. " * 500  # ~3,500 tokens


class Unbounded(FakeModels):
    """Writes far past the request's max_tokens, then keeps writing (until the caller leaves)."""

    def generate(
        self, replica: str, request: model_pb2.GenerateRequest, deadline_s: float
    ) -> FakeStream:
        self.calls.append((replica, request))
        return Held(_answer(replica, WORDS)[:2])


async def test_a_call_left_past_its_max_tokens_is_billed_max_tokens() -> None:
    rig = Rig(models=Unbounded())
    pipeline = _pipeline(rig, RouterMetrics(new_registry(), TenantLabels(4)))
    request = build_request("Capital of France?", model="sim-large", max_tokens=MAX_TOKENS)
    async with contextlib.aclosing(pipeline.run("tenant-a", request)) as run:
        async for chunk in run:
            if chunk.WhichOneof("part") == "delta":
                break  # the caller leaves after the first (long) words
    await pipeline.drain()
    (final,) = [c for c in rig.prefix.commits if c.phase == pc.COMMIT_PHASE_FINAL]
    assert final.output_tokens == MAX_TOKENS  # was 3,501


async def test_a_killed_routers_open_call_is_billed_at_most_max_tokens(tmp_path: Path) -> None:
    """The open call journalled for a router killed mid-answer bills the router's count at
    most max_tokens too: before, 1,752 tokens of an upstream past max_tokens=20."""
    prefix = FakePrefix()
    outbox = BillingOutbox(prefix, Journal(tmp_path / "data"), 1.0, 0.01, wall=ManualClock())
    clock = FakeClock()
    models = WritingModels(clock=clock, pieces=[WORDS[:1000]] * 8)
    rig = Rig(prefix=prefix, outbox=outbox, models=models, clock=clock)
    pipeline = rig.pipeline()
    request = build_request("Tides?", model="sim-large", max_tokens=MAX_TOKENS)
    deltas = 0
    async with contextlib.aclosing(pipeline.run("tenant-a", request)) as run:
        async for chunk in run:
            deltas += chunk.WhichOneof("part") == "delta"
            if deltas == 8:
                break
        assert await outbox.flush() == 0
        journal = _restarted(tmp_path / "data", tmp_path / "restarted")  # killed now
    await pipeline.drain()
    again = FakePrefix()
    restarted = BillingOutbox(again, journal, 1.0, 0.01)
    assert await restarted.flush() == 1
    (final,) = [c for c in again.commits if c.phase == pc.COMMIT_PHASE_FINAL]
    assert final.output_tokens == MAX_TOKENS  # was 1,752
