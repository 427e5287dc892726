"""A model call billed without its answer is on the request's trace and in the GenAI metrics.

A call the caller cancels after the prefill, or one whose replica is cut before another replica
answers, is billed in the background once its FINAL is known: the ``chat <model>`` span stays
open until then (it ends at the time the call ended) and carries the bill's ``gen_ai.usage.*``
and cost; the request's span, while still open (the Gateway's waits for them), sums such
bills as ``cachemesh.unanswered_cost_nanos``; ``gen_ai_client_token_usage`` counts the billed
tokens.
"""

from __future__ import annotations

import contextlib

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.metrics import TenantLabels, new_registry
from services.router.dependencies import Dependencies
from services.router.metrics import RouterMetrics
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
from tests.unit.test_router_unanswered_money import CutFirst, HeldModels
from tests.unit.test_service_metrics import value

NAMES = {
    "gen_ai_operation_name": "chat",
    "gen_ai_provider_name": "cachemesh.simulated",
    "gen_ai_request_model": "sim-large",
    "gen_ai_response_model": "sim-large",
}
USAGE = "gen_ai_client_token_usage_sum"


class Traced:
    def __init__(self, rig: Rig) -> None:
        self.exported = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.exported))
        self.tracer = provider.get_tracer("test")
        self.registry: CollectorRegistry = new_registry()
        metrics = RouterMetrics(self.registry, TenantLabels(4))
        deps = Dependencies(rig.semantic, rig.prefix, rig.models, REPLICAS)
        router = (load_router_model(), RouterCard.load().default_threshold, None)
        self.pipeline = Pipeline(
            deps, TABLE, TOKENIZER, self.tracer, _settings(), router, clock=rig.clock,
            metrics=metrics,
        )  # fmt: skip

    def span(self, name: str) -> ReadableSpan:
        (found,) = [s for s in self.exported.get_finished_spans() if s.name == name]
        return found

    def chats(self) -> list[ReadableSpan]:
        spans = self.exported.get_finished_spans()
        return sorted(
            (s for s in spans if s.name.startswith("chat ")), key=lambda s: s.start_time or 0
        )


async def test_a_cancelled_calls_bill_is_on_its_chat_span_and_in_the_token_metric() -> None:
    rig = Rig(models=HeldModels())
    traced = Traced(rig)
    with traced.tracer.start_as_current_span("request"):  # the Gateway call's span
        async with contextlib.aclosing(traced.pipeline.run("tenant-a", _request())) as run:
            async for chunk in run:
                if chunk.WhichOneof("part") == "delta":
                    break  # the caller leaves after the first words
    # this span ended with the pipeline; the bill comes after (the Gateway's span waits for it:
    # rpc_tracing.end_after, test_tracing)
    await traced.pipeline.drain()
    (final,) = [c for c in rig.prefix.commits if c.phase == pc.COMMIT_PHASE_FINAL]
    (chat,) = traced.chats()
    attributes = chat.attributes
    assert attributes is not None
    assert attributes["gen_ai.usage.output_tokens"] == final.output_tokens > 0
    assert attributes["gen_ai.usage.input_tokens"] == 40
    assert attributes["gen_ai.usage.cache_read.input_tokens"] == 0
    assert attributes["cachemesh.cost_nanos"] == 123
    assert attributes["cachemesh.baseline_nanos"] == 456
    assert attributes["cachemesh.cost_estimated"] is False
    root = traced.span("request")
    assert root.attributes is not None
    assert "cachemesh.unanswered_cost_nanos" not in root.attributes  # it ended before the bill
    assert chat.parent is not None and chat.parent.span_id == root.context.span_id
    registry = traced.registry
    assert value(registry, USAGE, gen_ai_token_type="output", **NAMES) == final.output_tokens
    assert value(registry, USAGE, gen_ai_token_type="input", **NAMES) == 40
    duration = "gen_ai_client_operation_duration_seconds_count"
    assert value(registry, duration, error_type="cancelled", **NAMES) == 1


async def test_a_cut_calls_bill_is_on_its_chat_span_and_summed_on_the_requests_span() -> None:
    rig = Rig(models=CutFirst())
    traced = Traced(rig)
    with traced.tracer.start_as_current_span("request"):
        chunks = [c async for c in traced.pipeline.run("tenant-a", _request(), streamed=False)]
        await traced.pipeline.drain()  # the cut call's bill comes while the request runs on
    end = chunks[-1].end
    cut_final, answered_final = [c for c in rig.prefix.commits if c.phase == pc.COMMIT_PHASE_FINAL]
    cut, answered = traced.chats()
    assert cut.attributes is not None and answered.attributes is not None
    assert cut.attributes["error.type"] == "replica_cut"
    assert cut.attributes["gen_ai.usage.output_tokens"] == cut_final.output_tokens > 0
    assert cut.attributes["gen_ai.usage.input_tokens"] == 40
    assert cut.attributes["cachemesh.cost_nanos"] == 123
    # every model call's span carries what it was billed
    assert answered.attributes["gen_ai.usage.output_tokens"] == end.usage.output_tokens == 3
    assert answered.attributes["cachemesh.cost_nanos"] == end.cost.cost_nanos == 123
    root = traced.span("request")
    assert root.attributes is not None
    assert root.attributes["cachemesh.cost_nanos"] == 123  # the answer's own bill
    assert root.attributes["cachemesh.unanswered_cost_nanos"] == 123  # and the cut call's
    registry = traced.registry
    output = value(registry, USAGE, gen_ai_token_type="output", **NAMES)
    assert output == cut_final.output_tokens + answered_final.output_tokens
    assert value(registry, USAGE, gen_ai_token_type="input", **NAMES) == 80
    assert (
        value(registry, "gen_ai_client_token_usage_count", gen_ai_token_type="input", **NAMES) == 2
    )


async def test_a_chat_spans_input_tokens_are_the_whole_prompt_as_the_token_metric_counts() -> None:
    """The GenAI conventions' ``gen_ai.usage.input_tokens`` is the whole prompt, cached tokens
    included (the model service's span and ``gen_ai_client_token_usage{type=input}`` say so);
    the router's ``chat`` span said only the uncached part (Anthropic's ``input_tokens``)."""
    rig = Rig(prefix=FakePrefix(read_tokens=30))  # 10 uncached + 30 read from the cache
    traced = Traced(rig)
    chunks = [c async for c in traced.pipeline.run("tenant-a", _request(), streamed=False)]
    await traced.pipeline.drain()
    usage = chunks[-1].end.usage
    assert (usage.input_tokens, usage.cache_read_input_tokens) == (10, 30)
    (chat,) = traced.chats()
    attributes = chat.attributes
    assert attributes is not None
    prompt = value(traced.registry, USAGE, gen_ai_token_type="input", **NAMES)
    assert attributes["gen_ai.usage.input_tokens"] == prompt == 40
    assert attributes["gen_ai.usage.cache_read.input_tokens"] == 30
    assert attributes["cachemesh.usage.uncached_input_tokens"] == 10
