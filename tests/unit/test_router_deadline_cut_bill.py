"""A call cut by its caller's own short deadline is billed by prefix-cache, not the outbox.

The request's prefix-cache calls (Plan, WARM) are bounded by half of what the caller's deadline
leaves; a short deadline (0.1 s) cuts them, which turns the request's prefix-cache calls off
(``PrefixWindow``, ``clients``). The bill of a call that ended early is made after the caller
left: it goes to prefix-cache under the router's own ``ROUTER_PREFIX_TIMEOUT_S`` (the caller's
deadline is no bound on it), so its money counters count what prefix-cache billed, not the
router's estimate at base prices (a review found a cut call's estimate 9.4x its bill, and a
tenant's cost counters 8.3% over prefix-cache's and the limits' after 2 such calls of 263).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from opentelemetry import trace
from prometheus_client import CollectorRegistry

from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.errors import Code
from services.common.logs import JsonLines
from services.common.metrics import TenantLabels, new_registry
from services.router.access_log import RequestLog
from services.router.dependencies import CallFailed, Dependencies
from services.router.metrics import RouterMetrics
from services.router.outbox import BillingOutbox
from services.router.pipeline import Pipeline
from services.router.routing.model import RouterCard, load_router_model
from tests.unit.test_router_pipeline import (
    REPLICAS,
    TABLE,
    TOKENIZER,
    FakePrefix,
    Rig,
    _request,
    _settings,
)
from tests.unit.test_router_unanswered_money import HeldModels
from tests.unit.test_service_metrics import logs  # noqa: F401 (a fixture)

# how long prefix-cache takes to answer a call (a long cached system prompt's Plan and WARM)
_PREFIX_TAKES_S = 0.2


@dataclass
class SlowPrefix(FakePrefix):
    """Answers a call given at least ``_PREFIX_TAKES_S``; a call given less times out."""

    def _in_time(self, deadline_s: float) -> None:
        if deadline_s < _PREFIX_TAKES_S:
            raise CallFailed(Code.DEADLINE_EXCEEDED, "Deadline Exceeded")

    async def plan(self, request: pc.PlanRequest, deadline_s: float) -> pc.PlanResponse:
        reply = await super().plan(request, deadline_s)
        self._in_time(deadline_s)
        return reply

    async def commit(self, request: pc.CommitRequest, deadline_s: float) -> pc.CommitResponse:
        reply = await super().commit(request, deadline_s)
        self._in_time(deadline_s)
        return reply


def _cost_sum(registry: CollectorRegistry) -> float:
    """What the router's cost counters say the tenant was billed: every ``served_by``, plus
    the outbox replays' corrections (up) minus theirs (down)."""
    total = 0.0
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name == "cachemesh_router_cost_nanos_total":
                total += sample.value
            elif sample.name == "cachemesh_router_cost_corrections_nanos_total":
                sign = 1 if sample.labels["direction"] == "up" else -1
                total += sign * sample.value
    return total


def _billed(prefix: FakePrefix, since: int = 0) -> int:
    """What prefix-cache billed: 123 nano-dollars a FINAL it took (``FakePrefix``), of its
    commits from ``since`` on (those before it refused while down)."""
    return 123 * sum(1 for c in prefix.commits[since:] if c.phase == pc.COMMIT_PHASE_FINAL)


async def test_a_call_cut_by_the_callers_short_deadline_is_billed_by_prefix_cache(
    logs: Callable[[dict[str, str]], tuple[io.StringIO, JsonLines | None]],  # noqa: F811
) -> None:
    registry = new_registry()
    metrics = RouterMetrics(registry, TenantLabels(4))
    out, lines = logs({})
    access = RequestLog(metrics, TABLE, lambda: 0.0, lines)
    call = access.begin("StreamComplete")
    call.tenant = "tenant-a"
    rig = Rig(prefix=SlowPrefix(), models=HeldModels())
    outbox = BillingOutbox(rig.prefix, None, 2.0, 0.01)
    deps = Dependencies(rig.semantic, rig.prefix, rig.models, REPLICAS)
    router = (load_router_model(), RouterCard.load().default_threshold, None)
    pipeline = Pipeline(
        deps, TABLE, TOKENIZER, trace.NoOpTracer(), _settings(), router, clock=rig.clock,
        metrics=metrics, outbox=outbox,
    )  # fmt: skip
    request = _request()
    run = pipeline.run("tenant-a", request, time_remaining_s=0.1, bills=call.bills)
    async with contextlib.aclosing(run) as chunks:
        async for chunk in chunks:
            if chunk.WhichOneof("part") == "delta":
                break  # the caller's deadline: it leaves after the first words
    access.finish(call, request, "DEADLINE_EXCEEDED")
    await pipeline.drain()
    await asyncio.sleep(0)  # the access line's callback
    kept = outbox.pending
    await outbox.flush()  # the replay of a kept bill (the old way: ~1 s later)
    # the router's cost counters, what prefix-cache billed, and the bills kept in the outbox
    assert (_cost_sum(registry), _billed(rig.prefix), kept) == (123, 123, 0)
    # the Plan was cut by the caller's deadline (its prefix-cache calls were off since); the
    # WARM and FINAL were sent after the caller left, under the router's own timeout
    assert rig.prefix.plans
    phases = [c.phase for c in rig.prefix.commits]
    assert phases == [pc.COMMIT_PHASE_WARM, pc.COMMIT_PHASE_FINAL]
    assert all(c.request.messages for c in rig.prefix.commits[:1])  # the WARM with its request
    unanswered = {"tenant": "tenant-a", "served_by": "unanswered"}
    assert registry.get_sample_value("cachemesh_router_cost_nanos_total", unanswered) == 123
    # its access line says the bill, not an estimate
    (line,) = [json.loads(text) for text in out.getvalue().splitlines() if '"access"' in text]
    assert (line["cost_nanos"], line["unanswered_cost_nanos"]) == (123, 123)
    assert not line.get("cost_estimated")


async def test_with_prefix_cache_down_a_replays_correction_makes_the_counters_the_bill() -> None:
    """prefix-cache down at the bill: the estimate is counted and the bill kept; once a replay
    bills it, the correction (billed minus estimate) is counted, and the counters sum to what
    prefix-cache billed."""
    registry = new_registry()
    metrics = RouterMetrics(registry, TenantLabels(4))
    rig = Rig(models=HeldModels())
    outbox = BillingOutbox(rig.prefix, None, 2.0, 0.01, cost_corrected=metrics.cost_corrected)
    deps = Dependencies(rig.semantic, rig.prefix, rig.models, REPLICAS)
    router = (load_router_model(), RouterCard.load().default_threshold, None)
    pipeline = Pipeline(
        deps, TABLE, TOKENIZER, trace.NoOpTracer(), _settings(), router, clock=rig.clock,
        metrics=metrics, outbox=outbox,
    )  # fmt: skip
    rig.prefix.down = True
    async with contextlib.aclosing(pipeline.run("tenant-a", _request())) as chunks:
        async for chunk in chunks:
            if chunk.WhichOneof("part") == "delta":
                break
    await pipeline.drain()
    assert outbox.pending == 1
    spec = TABLE.get("sim-large")
    assert spec is not None
    unanswered = {"tenant": "tenant-a", "served_by": "unanswered"}
    estimate = registry.get_sample_value("cachemesh_router_cost_nanos_total", unanswered)
    assert estimate is not None and estimate > 123  # the estimate at base prices
    refused = len(rig.prefix.commits)
    rig.prefix.down = False
    assert await outbox.flush() == 1
    assert _cost_sum(registry) == _billed(rig.prefix, refused) == 123
    down = {"tenant": "tenant-a", "direction": "down"}
    assert (
        registry.get_sample_value("cachemesh_router_cost_corrections_nanos_total", down)
        == estimate - 123
    )


@dataclass
class FailingCommits(SlowPrefix):
    """As ``SlowPrefix``, and each commit fails with ``code`` (prefix-cache failing after the
    caller left, or hung: a real failure)."""

    code: Code = Code.UNAVAILABLE

    async def commit(self, request: pc.CommitRequest, deadline_s: float) -> pc.CommitResponse:
        self.commits.append(request)
        raise CallFailed(self.code, "prefix-cache failed")


@pytest.mark.parametrize("code", [Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED])
async def test_the_bill_of_a_deadline_cut_call_goes_to_the_outbox_on_a_real_failure(
    code: Code,
) -> None:
    """The bill made under the router's own timeout falls back to the outbox when prefix-cache
    fails it: its WARM, sent again with the request, failed, so no FINAL follows it (a timeout
    given the whole ROUTER_PREFIX_TIMEOUT_S ends the bill's calls; a failure leaves a FINAL that
    prefix-cache could only refuse, FAILED_PRECONDITION, it holding no WARM: counted as a
    second degradation, it was a doomed call)."""
    registry = new_registry()
    metrics = RouterMetrics(registry, TenantLabels(4))
    rig = Rig(prefix=FailingCommits(code=code), models=HeldModels())
    outbox = BillingOutbox(rig.prefix, None, 2.0, 0.01)
    deps = Dependencies(rig.semantic, rig.prefix, rig.models, REPLICAS)
    router = (load_router_model(), RouterCard.load().default_threshold, None)
    pipeline = Pipeline(
        deps, TABLE, TOKENIZER, trace.NoOpTracer(), _settings(), router, clock=rig.clock,
        metrics=metrics, outbox=outbox,
    )  # fmt: skip
    run = pipeline.run("tenant-a", _request(), time_remaining_s=0.1)
    async with contextlib.aclosing(run) as chunks:
        async for chunk in chunks:
            if chunk.WhichOneof("part") == "delta":
                break
    await pipeline.drain()
    assert outbox.pending == 1  # kept: billed by the replay
    assert [c.phase for c in rig.prefix.commits] == [pc.COMMIT_PHASE_WARM]
