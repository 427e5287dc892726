"""Model calls billed without an answer reach the money metrics and the access log.

A call the caller cancels after the prefill, or one whose replica is cut before another
replica answers, is billed by prefix-cache (its FINAL); the router's cost, baseline, saved and
token counters count it under ``served_by="unanswered"`` (no request is counted), and the
cancelled call's access-log line carries the bill once it is known. An answer billed in full
whose caller left before it reached it is counted under the layer that served it.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from opentelemetry import trace

from cachemesh import build_request
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.errors import Code
from services.common.logs import JsonLines
from services.common.metrics import TenantLabels, new_registry
from services.router import servicer as servicer_module
from services.router.access_log import RequestLog
from services.router.dependencies import CallFailed, Dependencies
from services.router.metrics import RouterMetrics
from services.router.pipeline import Pipeline, chunks_of
from services.router.routing.model import RouterCard, load_router_model
from tests.unit.gateway_support import gateway_servicer
from tests.unit.test_router_answer_ledger import KEY, FakeContext
from tests.unit.test_router_partial_billing import Held
from tests.unit.test_router_pipeline import (
    REPLICAS,
    TABLE,
    TOKENIZER,
    FakeModels,
    FakeStream,
    Rig,
    _answer,
    _request,
    _settings,
)
from tests.unit.test_service_metrics import logs, value  # noqa: F401 (a fixture)
from tests.waits import reached

UNANSWERED = {"tenant": "tenant-a", "served_by": "unanswered"}

# the answer ledger's wait: the service's 0.5 s fails open under load (the call goes on unclaimed)
PATIENT_S = 10.0


@pytest.fixture(autouse=True)
def _patient_ledger(monkeypatch: pytest.MonkeyPatch) -> None:
    """A loaded test machine may take longer than the service's 0.5 s to answer."""
    monkeypatch.setattr(servicer_module, "LEDGER_TIMEOUT_S", PATIENT_S)


def _pipeline(rig: Rig, metrics: RouterMetrics) -> Pipeline:
    deps = Dependencies(rig.semantic, rig.prefix, rig.models, REPLICAS)
    router = (load_router_model(), RouterCard.load().default_threshold, None)
    return Pipeline(
        deps, TABLE, TOKENIZER, trace.NoOpTracer(), _settings(), router, clock=rig.clock,
        metrics=metrics,
    )  # fmt: skip


class HeldModels(FakeModels):
    """Each call writes a few words, then keeps writing (until the caller leaves)."""

    def generate(
        self, replica: str, request: model_pb2.GenerateRequest, deadline_s: float
    ) -> FakeStream:
        self.calls.append((replica, request))
        return Held(_answer(replica)[:2])


class CutFirst(FakeModels):
    """The first replica called dies mid-answer; the next one answers."""

    def generate(
        self, replica: str, request: model_pb2.GenerateRequest, deadline_s: float
    ) -> FakeStream:
        self.calls.append((replica, request))
        if len(self.calls) == 1:
            died = CallFailed(Code.UNAVAILABLE, "replica died")
            return FakeStream([*_answer(replica)[:2], died])
        return FakeStream(_answer(replica))


async def test_a_cancelled_calls_bill_reaches_the_money_counters_and_its_access_line(
    logs: Callable[[dict[str, str]], tuple[io.StringIO, JsonLines | None]],  # noqa: F811
) -> None:
    registry = new_registry()
    metrics = RouterMetrics(registry, TenantLabels(4))
    out, lines = logs({})
    log = RequestLog(metrics, TABLE, lambda: 0.0, lines)
    rig = Rig(models=HeldModels())
    pipeline = _pipeline(rig, metrics)
    call = log.begin("StreamComplete")
    call.tenant = "tenant-a"
    request = _request()
    async with contextlib.aclosing(pipeline.run("tenant-a", request, bills=call.bills)) as run:
        async for chunk in run:
            if chunk.WhichOneof("part") == "delta":
                break  # the caller leaves after the first words
    log.finish(call, request, "CANCELLED")
    await pipeline.drain()
    await asyncio.sleep(0)  # the line's callback
    (final,) = [c for c in rig.prefix.commits if c.phase == pc.COMMIT_PHASE_FINAL]
    assert value(registry, "cachemesh_router_cost_nanos_total", **UNANSWERED) == 123
    assert value(registry, "cachemesh_router_baseline_nanos_total", **UNANSWERED) == 456
    assert value(registry, "cachemesh_router_saved_nanos", **UNANSWERED) == 333
    output = value(registry, "cachemesh_router_tokens_total", type="output", **UNANSWERED)
    assert output == final.output_tokens > 0
    assert value(registry, "cachemesh_router_requests_total", served_by="unanswered") == 0
    (line,) = [json.loads(text) for text in out.getvalue().splitlines() if '"access"' in text]
    assert line["status"] == "CANCELLED"
    assert (line["cost_nanos"], line["baseline_nanos"], line["unanswered_cost_nanos"]) == (
        123,
        456,
        123,
    )
    assert line["output_tokens"] == final.output_tokens


async def test_a_cut_attempt_before_a_retry_is_counted_beside_the_answer() -> None:
    registry = new_registry()
    metrics = RouterMetrics(registry, TenantLabels(4))
    rig = Rig(models=CutFirst())
    pipeline = _pipeline(rig, metrics)
    chunks = [c async for c in pipeline.run("tenant-a", _request(), streamed=False)]
    await pipeline.drain()
    assert chunks[-1].end.cost.cost_nanos == 123  # the answer's own bill
    finals = [c for c in rig.prefix.commits if c.phase == pc.COMMIT_PHASE_FINAL]
    assert len(finals) == 2  # prefix-cache billed both calls
    assert value(registry, "cachemesh_router_cost_nanos_total", **UNANSWERED) == 123
    assert value(registry, "cachemesh_router_baseline_nanos_total", **UNANSWERED) == 456


async def test_an_unbilled_estimate_is_counted_when_prefix_cache_is_down() -> None:
    """No outbox (the offline case) and prefix-cache down: the estimate at base prices."""
    registry = new_registry()
    metrics = RouterMetrics(registry, TenantLabels(4))
    rig = Rig(models=HeldModels())
    rig.prefix.down = True
    pipeline = _pipeline(rig, metrics)
    async with contextlib.aclosing(pipeline.run("tenant-a", _request())) as run:
        async for chunk in run:
            if chunk.WhichOneof("part") == "delta":
                break
    await pipeline.drain()
    spec = TABLE.get("sim-large")
    assert spec is not None
    output = value(registry, "cachemesh_router_tokens_total", type="output", **UNANSWERED)
    expected = spec.baseline_nanos(40, int(output))
    assert expected > 0
    assert value(registry, "cachemesh_router_cost_nanos_total", **UNANSWERED) == expected
    assert value(registry, "cachemesh_router_saved_nanos", **UNANSWERED) == 0


class BilledPipeline:
    """A model answer billed in full (its FINAL committed) before it goes out."""

    async def run(
        self, tenant: str, request: pb.CompleteRequest, *args: Any, **kwargs: Any
    ) -> AsyncIterator[pb.CompleteChunk]:
        answer = pb.CompleteResponse(
            served_by=pb.LAYER_MODEL,
            model="sim-small",
            tier="small",
            request_id=request.request_id,
            usage=pb.Usage(input_tokens=40, output_tokens=12),
            cost=pb.Cost(cost_nanos=133_000, baseline_nanos=150_000, saved_nanos=17_000),
        )
        answer.content.add(text="The harbour at dawn.")
        for chunk in chunks_of(answer):
            yield chunk


class HeldLedger:
    """An answer ledger whose record of an answer takes until the caller has left."""

    def __init__(self) -> None:
        self.recording = asyncio.Event()

    async def record(self, *args: Any) -> None:
        self.recording.set()
        await asyncio.Event().wait()


@pytest.mark.parametrize("method", ["Complete", "StreamComplete"])
async def test_an_answer_billed_whose_caller_left_before_it_is_counted_as_billed(
    method: str,
) -> None:
    """The caller leaves (its deadline, a cancel) while the router records an answer that
    prefix-cache has billed in full: the money counters count what was billed, under the layer
    that served it, and the request is an error, not an answered request."""
    registry = new_registry()
    ledger = HeldLedger()
    servicer = gateway_servicer(
        BilledPipeline(),
        {KEY: "tenant-a"},
        metrics=RouterMetrics(registry, TenantLabels(4)),
        ledger=ledger,  # type: ignore[arg-type]
    )
    # the caller's own id: its answer is recorded in the ledger before it goes out
    request = build_request("Describe a harbour at dawn.", model="sim-small", request_id="r-1")
    context = FakeContext()
    if method == "Complete":
        call: asyncio.Future[Any] = asyncio.ensure_future(
            servicer.Complete(request, context)  # type: ignore[arg-type]
        )
    else:

        async def read() -> None:
            async for _ in servicer.StreamComplete(request, context):  # type: ignore[arg-type]
                pass

        call = asyncio.ensure_future(read())
    await reached(ledger.recording, "ledger.recording")
    call.cancel()  # the caller left
    with pytest.raises(asyncio.CancelledError):
        await call
    layer = {"tenant": "tenant-a", "served_by": "model"}
    assert value(registry, "cachemesh_router_cost_nanos_total", **layer) == 133_000
    assert value(registry, "cachemesh_router_baseline_nanos_total", **layer) == 150_000
    assert value(registry, "cachemesh_router_saved_nanos", **layer) == 17_000
    assert value(registry, "cachemesh_router_tokens_total", type="output", **layer) == 12
    assert (
        value(
            registry,
            "cachemesh_router_errors_total",
            tenant="tenant-a",
            code="CANCELLED",
            deadline="",
        )
        == 1
    )
    assert value(registry, "cachemesh_router_requests_total", served_by="model") == 0
    cost = [
        s.value
        for metric in registry.collect()
        if metric.name == "cachemesh_router_cost_nanos"
        for s in metric.samples
        if s.name.endswith("_total")
    ]
    assert sum(cost) == 133_000  # once: not also as unanswered
