"""The other lines that came once a request (or a replay round) during one part's outage: a
replica's failed calls, and the billing outbox's entries kept while prefix-cache refuses
them. Each is logged at once the first time, then once an interval at most, saying how many
were not logged; the spans and counts are per call as before. Fake clocks: nothing sleeps.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from opentelemetry import trace

from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.clock import ManualClock
from services.common.errors import Code, RequestError
from services.router.dependencies import Dependencies
from services.router.outbox import BillingOutbox
from services.router.outbox_journal import Journal
from services.router.pipeline import Pipeline
from services.router.routing.model import RouterCard, load_router_model
from tests.unit.test_router_outbox import FakePrefix as OutboxPrefix
from tests.unit.test_router_pipeline import (
    REPLICAS,
    TABLE,
    TOKENIZER,
    FakeClock,
    FakeModels,
    FakePrefix,
    FakeSemantic,
    _request,
    _settings,
)


def _warnings(caplog: pytest.LogCaptureFixture, words: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and words in r.message
    ]


async def _ask(pipeline: Pipeline) -> None:
    """One request to sim-small, whose one replica fails: refused."""
    with pytest.raises(RequestError):
        async for _ in pipeline.run("t", _request("sim-small"), time_remaining_s=10.0):
            pass


async def test_a_replica_down_is_a_line_each_ten_seconds(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    models = FakeModels(failing={"small-1"})
    deps = Dependencies(FakeSemantic(), FakePrefix(), models, dict(REPLICAS))
    router = (load_router_model(), RouterCard.load().default_threshold, None)
    tracer = trace.get_tracer("test")
    pipeline = Pipeline(deps, TABLE, TOKENIZER, tracer, _settings(), router, clock=clock)
    for _ in range(100):  # 100 requests in 5 s, each tries the replica (ejected: all the same)
        await _ask(pipeline)
        clock.now += 0.05
    assert len(_warnings(caplog, "replica small-1 of sim-small failed")) == 1
    assert len(models.calls) == 100  # every request tried it
    clock.now += 10
    await _ask(pipeline)
    lines = _warnings(caplog, "replica small-1 of sim-small failed")
    assert len(lines) == 2 and "99 more since the last such line, not logged" in lines[1]


async def test_entries_kept_while_prefix_cache_refuses_are_a_line_each_ten_seconds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    prefix, wall = OutboxPrefix(), ManualClock()
    outbox = BillingOutbox(prefix, Journal(tmp_path), 1.0, 1.0, wall=wall, ages=wall)
    await outbox.keep([pc.CommitRequest(tenant="t", request_id="a#1", phase=pc.COMMIT_PHASE_FINAL)])
    prefix.down, prefix.refuse = False, Code.RESOURCE_EXHAUSTED
    for _ in range(60):  # a minute of replay rounds (ROUTER_OUTBOX_RETRY_S=1)
        assert await outbox.flush() == 0
        wall.advance(s=1)
    lines = _warnings(caplog, "answers kept for the next try")
    assert len(lines) == 6 and "9 more since the last such line" in lines[1]
    prefix.refuse = Code.INTERNAL  # another code: at once
    await outbox.flush()
    assert len(_warnings(caplog, "answers kept for the next try")) == 7
    assert outbox.pending == 1
