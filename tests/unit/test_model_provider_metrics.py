"""A provider replica's prompt and KV-reuse metrics come from what the engine reports at the
end: its ``start`` cannot tell them (``kv_cached_unreported``). An OpenAI-compatible engine
(llama-server, vLLM) reports its KV reuse as ``usage.prompt_tokens_details.cached_tokens``;
here the loopback OpenAI server of ``tests.providers`` sends that usage chunk to the official
SDK."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.metrics import new_registry
from services.common.tokens import load_cl100k
from services.model.metrics import ModelMetrics
from services.model.providers.progress import Progress
from tests.providers import openai_wire
from tests.providers.loopback import serving
from tests.providers.replica import provider_replica, provider_settings
from tests.providers.wire_server import Reply, WireServer

MODEL = "local-small"
PLAN_ESTIMATE = 40  # Plan's count of the prompt, on the request


@pytest.fixture(scope="module")
def server() -> Iterator[WireServer]:
    yield from serving()


def _request() -> model_pb2.GenerateRequest:
    message = pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="How much?")])
    request = pb.CompleteRequest(model=MODEL, max_tokens=8, messages=[message])
    call = model_pb2.GenerateRequest(tenant="t", model=MODEL, request=request)
    call.prompt.prompt_tokens = PLAN_ESTIMATE
    return call


async def _served(server: WireServer, *replies: Reply) -> CollectorRegistry:
    """Each reply served by the engine through a provider replica, its chunks metered as
    the servicer meters them."""
    settings = provider_settings("openai", server.base + "/v1")  # an engine that takes no key
    api = provider_replica(settings, [MODEL], tokenizer=load_cl100k())
    registry = new_registry()
    ticks = itertools.count()
    metrics = ModelMetrics(registry, [MODEL], lambda: float(next(ticks)))
    server.script("openai", *replies)
    try:
        for _ in replies:
            call = metrics.begin(MODEL)
            async for chunk in api.generate(_request(), 10.0):
                metrics.chunk(call, chunk)
            metrics.end(call, "ok")
    finally:
        await api.close()
    return registry


def _sample(registry: CollectorRegistry, name: str) -> float | None:
    return registry.get_sample_value(name, {"model": MODEL})


async def test_the_engines_reported_kv_reuse_and_prompt_are_counted(server: WireServer) -> None:
    """cachemesh_model_kv_cached_tokens_total stayed 0 for every engine, and the prompt count
    was Plan's estimate: the start's figures, which a provider cannot know."""
    registry = await _served(
        server,
        Reply(events=openai_wire.stream("m", ["$33."], openai_wire.usage(1203, 0, 3))),
        Reply(events=openai_wire.stream("m", ["$33."], openai_wire.usage(1203, 1195, 3))),
    )
    assert _sample(registry, "cachemesh_model_prompt_tokens_total") == 2406
    assert _sample(registry, "cachemesh_model_kv_cached_tokens_total") == 1195
    assert _sample(registry, "cachemesh_model_output_tokens_total") == 6


async def test_without_a_usage_report_the_estimate_is_counted(server: WireServer) -> None:
    """An engine without ``stream_options`` support reports nothing: the prompt is Plan's
    count, with no KV reuse claimed."""
    registry = await _served(server, Reply(events=openai_wire.stream("m", ["$33."], None)))
    assert _sample(registry, "cachemesh_model_prompt_tokens_total") == PLAN_ESTIMATE
    assert _sample(registry, "cachemesh_model_kv_cached_tokens_total") == 0


def test_an_anthropic_report_counts_its_cache_reads_as_reuse() -> None:
    registry = new_registry()
    metrics = ModelMetrics(registry, [MODEL], lambda: 0.0)
    call = metrics.begin(MODEL)
    metrics.chunk(call, Progress("r1", "anthropic", PLAN_ESTIMATE).start())
    end = model_pb2.GenerateEnd(output_tokens=5, stop_reason="end_turn")
    end.provider_usage.anthropic.CopyFrom(
        pc.AnthropicUsage(
            input_tokens=10,
            cache_creation_input_tokens=100,
            cache_read_input_tokens=1000,
            output_tokens=5,
        )
    )
    metrics.chunk(call, model_pb2.GenerateChunk(end=end))
    metrics.end(call, "ok")
    assert _sample(registry, "cachemesh_model_prompt_tokens_total") == 1110
    assert _sample(registry, "cachemesh_model_kv_cached_tokens_total") == 1000


def test_a_call_that_never_ends_counts_the_estimate_once() -> None:
    registry = new_registry()
    metrics = ModelMetrics(registry, [MODEL], lambda: 0.0)
    call = metrics.begin(MODEL)
    metrics.chunk(call, Progress("r1", "openai", PLAN_ESTIMATE).start())
    metrics.end(call, "cancelled")
    assert _sample(registry, "cachemesh_model_prompt_tokens_total") == PLAN_ESTIMATE
    assert _sample(registry, "cachemesh_model_kv_cached_tokens_total") == 0
