"""The hot-prefix guard through the router's pipeline: a call sent away from the replica
holding its prefix because that replica's load is imbalanced says so on its span."""

from __future__ import annotations

import asyncio
import contextlib

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cachemesh import build_request
from services.router.dependencies import Dependencies
from services.router.pipeline import Pipeline
from services.router.routing.model import RouterCard, load_router_model
from tests.unit.test_router_pipeline import TABLE, TOKENIZER, FakeSemantic, _settings
from tests.unit.test_router_replica_ejection import REPLICAS, Clock, Models, WarmOnLargeOne
from tests.unit.virtual_loop import run_on_clock
from tests.waits import reached

HOT = 65  # one more than SGLang's balance_abs_threshold (ROUTER_BALANCE_ABS_THRESHOLD)


def test_a_request_sent_off_its_hot_prefixs_replica_names_the_guard_on_its_span() -> None:
    """large-1 holds the prompt's prefix (prefix-cache's view) and its answers stream on
    without end (a batching engine decoding them: its prefill queue stays empty), so the TTFT
    policy sent every request there; with 65 in flight on it and none on large-2, the next
    goes to large-2 and its model-call span says why (``load_imbalance``)."""
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    clock = Clock()

    async def scenario() -> None:
        models = Models(clock, {}, held={"large-1", "large-2"})
        deps = Dependencies(FakeSemantic(), WarmOnLargeOne(), models, REPLICAS)
        router = (load_router_model(), RouterCard.load().default_threshold, None)
        pipeline = Pipeline(
            deps, TABLE, TOKENIZER, provider.get_tracer("t"), _settings(), router, clock=clock
        )
        first_tokens: list[asyncio.Event] = []

        async def ask(i: int, got: asyncio.Event) -> None:
            request = build_request(f"question {i}", model="sim-large", request_id=f"r{i}")
            async with contextlib.aclosing(pipeline.run("tenant-a", request)) as run:
                async for chunk in run:
                    if chunk.WhichOneof("part") == "delta":
                        got.set()  # its answer streams on: the call stays in flight

        tasks = []
        for i in range(HOT + 1):
            got = asyncio.Event()
            first_tokens.append(got)
            tasks.append(asyncio.create_task(ask(i, got)))
            await reached(got, "got")  # one at a time: each sees the calls before it in flight
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await pipeline.drain()
        assert models.calls == ["large-1"] * HOT + ["large-2"], models.calls

    run_on_clock(clock, scenario)
    chats = [
        dict(span.attributes or {})
        for span in memory.get_finished_spans()
        if span.name.startswith("chat ")
    ]
    reasons = [(c["cachemesh.replica"], c["cachemesh.route_reason"]) for c in chats]
    assert reasons.count(("large-1", "ttft_warm")) == HOT, reasons
    guarded = [c for c in chats if c["cachemesh.replica"] == "large-2"]
    assert len(guarded) == 1, reasons
    assert guarded[0]["cachemesh.route_reason"] == "load_imbalance"  # was ttft_warm on large-1
    assert guarded[0]["cachemesh.kv_match_tokens"] == 0  # the prefix goes to large-2 too
    assert guarded[0]["cachemesh.replica_load"] == 0
