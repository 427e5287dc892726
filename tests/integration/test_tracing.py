"""Telemetry as a contract: one request, one trace, spans from every service it touched."""

from __future__ import annotations

import time
import uuid

import grpc
import pytest

from cachemesh import Client, build_request
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import gateway_pb2_grpc
from services.tools.stack.otlp_sink import Span
from tests.integration.harness import RunningStack

pytestmark = pytest.mark.integration

_SERVICES = {"router", "semantic-cache", "prefix-cache", "model"}


def _complete(spans: list[Span], services: set[str]) -> bool:
    """Every service has reported, the root is in, and every parent named is present."""
    ids = {s.span_id for s in spans}
    return (
        services <= {s.service for s in spans}
        and any(not s.parent_span_id for s in spans)
        and all(not s.parent_span_id or s.parent_span_id in ids for s in spans)
    )


def _wait_for_spans(stack: RunningStack, trace_id: str, services: set[str]) -> list[Span]:
    """The trace's spans once complete (exporters batch, so spans arrive in any order)."""
    deadline = time.monotonic() + 20
    spans = stack.sink.spans_of(trace_id)
    while not _complete(spans, services) and time.monotonic() < deadline:
        time.sleep(0.2)
        spans = stack.sink.spans_of(trace_id)
    return spans


def _server_span(spans: list[Span], service: str, method: str) -> Span:
    matches = [s for s in spans if s.service == service and s.name.endswith(method)]
    assert matches, f"no {service} span for {method}: {[(s.service, s.name) for s in spans]}"
    return matches[0]


def test_one_request_is_one_trace_across_every_service(
    client_a: Client, stack: RunningStack
) -> None:
    response = client_a.complete(
        build_request(
            f"Which seats have extra legroom? {uuid.uuid4().hex[:8]}", namespace=uuid.uuid4().hex
        )
    )
    assert len(response.trace_id) == 32
    spans = _wait_for_spans(stack, response.trace_id, _SERVICES)
    assert {s.service for s in spans} == _SERVICES
    by_id = {s.span_id: s for s in spans}

    roots = [s for s in spans if not s.parent_span_id]
    assert len(roots) == 1 and roots[0].service == "router"
    root = roots[0]
    assert root.attributes["cachemesh.served_by"] == pb.Layer.Name(response.served_by)
    assert root.attributes["cachemesh.tier"] == response.tier
    assert root.attributes["cachemesh.cost_nanos"] == response.cost.cost_nanos
    assert root.attributes["cachemesh.baseline_nanos"] == response.cost.baseline_nanos

    for service, method in (
        ("semantic-cache", "SemanticCache/Lookup"),
        ("semantic-cache", "SemanticCache/Store"),
        ("prefix-cache", "PrefixCache/Plan"),
        ("prefix-cache", "PrefixCache/Commit"),
        ("model", "Model/Generate"),
    ):
        server = _server_span(spans, service, method)
        parent = by_id[server.parent_span_id]
        assert parent.service == "router", (service, method)  # the edge router → service

    chat = [s for s in spans if s.service == "router" and s.name.startswith("chat ")]
    assert len(chat) == 1
    attributes = chat[0].attributes
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.request.model"] == response.model
    usage = response.usage  # the conventions' input: the whole prompt, cached tokens included
    prompt = usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens
    assert attributes["gen_ai.usage.input_tokens"] == prompt
    assert attributes["cachemesh.usage.uncached_input_tokens"] == usage.input_tokens
    assert attributes["gen_ai.usage.output_tokens"] == response.usage.output_tokens
    assert "gen_ai.usage.cache_read.input_tokens" in attributes
    assert "gen_ai.usage.cache_creation.input_tokens" in attributes
    assert attributes["cachemesh.cost_nanos"] == response.cost.cost_nanos  # the call's bill
    assert "cachemesh.unanswered_cost_nanos" not in root.attributes  # no call billed unanswered


def test_a_semantic_hit_carries_its_similarity_on_the_root_span(
    client_a: Client, stack: RunningStack
) -> None:
    ns = uuid.uuid4().hex
    client_a.complete(build_request("How can I reach customer support?", namespace=ns))
    hit = client_a.complete(build_request("How do I contact customer support?", namespace=ns))
    assert hit.served_by == pb.LAYER_SEMANTIC_CACHE
    spans = _wait_for_spans(stack, hit.trace_id, {"router", "semantic-cache"})
    root = next(s for s in spans if not s.parent_span_id)
    assert root.attributes["cachemesh.served_by"] == "LAYER_SEMANTIC_CACHE"
    assert root.attributes["cachemesh.similarity"] == pytest.approx(hit.semantic.similarity)
    assert not any(s.service == "model" for s in spans)  # no model call at all


def test_speculative_decoding_reports_its_kept_draft_tokens(
    client_a: Client, stack: RunningStack
) -> None:
    """sim-large decodes with sim-small as its draft (SIM_SPECULATIVE in the tests' settings):
    the response and the spans carry the kept draft tokens; the bill is the output tokens."""
    ns = uuid.uuid4().hex
    large = client_a.complete(
        build_request(f"Explain the refund policy {ns[:8]}", model="sim-large", namespace=ns)
    )
    small = client_a.complete(
        build_request(f"Explain the refund policy {ns[8:16]}", model="sim-small", namespace=ns)
    )
    assert large.served_by == pb.LAYER_MODEL and small.served_by == pb.LAYER_MODEL
    assert 0 < large.usage.draft_accepted_tokens < large.usage.output_tokens
    assert small.usage.draft_accepted_tokens == 0  # sim-small has no draft of its own
    assert large.cost.cost_nanos == large.cost.baseline_nanos  # no cache: base prices only
    # sim-large has two replicas (model, model-2): the span is the one that served it
    spans = _wait_for_spans(stack, large.trace_id, {"router", "prefix-cache"})
    deadline = time.monotonic() + 20
    while not any(s.name.endswith("Model/Generate") and s.service != "router" for s in spans):
        assert time.monotonic() < deadline, [(s.service, s.name) for s in spans]
        time.sleep(0.2)
        spans = stack.sink.spans_of(large.trace_id)
    model = next(s for s in spans if s.name.endswith("Model/Generate") and s.service != "router")
    chat = next(s for s in spans if s.service == "router" and s.name.startswith("chat "))
    for span in (model, chat):
        assert span.attributes["cachemesh.draft_accepted_tokens"] == (
            large.usage.draft_accepted_tokens
        )


def test_a_cancelled_model_calls_bill_is_on_its_chat_span_and_the_root_span(
    stack: RunningStack,
) -> None:
    """The caller leaves mid-answer: prefix-cache bills the call for what it produced, after
    the call ended; the call's ``chat <model>`` span, which waits for that bill, carries its
    usage and cost, and so does the request's root span (``unanswered_cost_nanos``, as for a
    cut call's bill), which waits for it too and ends at the time the call ended."""
    before = stack.totals("tenant-a")
    request = build_request(
        f"Tell me about the history of aviation {uuid.uuid4().hex[:8]}.",
        model="sim-large",
        namespace=uuid.uuid4().hex,
    )
    with grpc.insecure_channel(stack.target) as channel:
        call = gateway_pb2_grpc.GatewayStub(channel).StreamComplete(
            request, metadata=(("authorization", f"Bearer {stack.keys['tenant-a']}"),), timeout=60
        )
        chunks = iter(call)
        start = next(chunks)
        assert start.WhichOneof("part") == "start"
        assert next(chunks).WhichOneof("part") == "delta"
        call.cancel()
    deadline = time.monotonic() + 20
    after = stack.totals("tenant-a")
    while after.requests == before.requests and time.monotonic() < deadline:
        time.sleep(0.1)
        after = stack.totals("tenant-a")
    assert after.requests == before.requests + 1  # the cancelled call, billed
    spans = _wait_for_spans(stack, start.start.trace_id, {"router", "prefix-cache", "model"})
    while not any(s.name.startswith("chat ") for s in spans) and time.monotonic() < deadline:
        time.sleep(0.2)
        spans = stack.sink.spans_of(start.start.trace_id)
    (chat,) = [s for s in spans if s.service == "router" and s.name.startswith("chat ")]
    attributes = chat.attributes
    assert (
        attributes["gen_ai.usage.output_tokens"]
        == (after.usage.output_tokens - before.usage.output_tokens)
        > 0
    )
    prompt = attributes["gen_ai.usage.input_tokens"]  # the whole prompt, cached tokens included
    billed_prompt = sum(
        getattr(after.usage, kind) - getattr(before.usage, kind)
        for kind in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
    )
    assert prompt == billed_prompt > 0
    assert attributes["cachemesh.cost_nanos"] == after.cost_nanos - before.cost_nanos > 0
    assert attributes["cachemesh.baseline_nanos"] == after.baseline_nanos - before.baseline_nanos
    assert "error.type" not in attributes  # the caller's choice, no error
    root = next(s for s in spans if not s.parent_span_id)
    assert chat.parent_span_id == root.span_id
    assert root.attributes["cachemesh.unanswered_cost_nanos"] == attributes["cachemesh.cost_nanos"]


def test_a_replayed_retry_is_marked_and_its_trace_links_the_first_calls(
    client_a: Client, stack: RunningStack
) -> None:
    """A retry with the same request_id is served the first answer: its response is marked
    ``replayed`` (the cost is the first call's, billed once), and its own trace, which had a
    bare router span, says it is a replay and links the span that produced the answer."""
    request_id = uuid.uuid4().hex
    request = build_request(
        f"Where is my boarding pass? {request_id[:8]}",
        model="sim-small",
        namespace=request_id,
        request_id=request_id,
    )
    first = client_a.complete(request)
    again = client_a.complete(request)
    assert not first.replayed and again.replayed
    assert again.cost == first.cost and again.trace_id == first.trace_id
    assert len(first.span_id) == 16
    served = _wait_for_spans(stack, first.trace_id, _SERVICES)
    root = next(s for s in served if not s.parent_span_id)
    assert root.span_id == first.span_id and "cachemesh.replayed" not in root.attributes
    replays: list[Span] = []
    deadline = time.monotonic() + 20
    while not replays:
        assert time.monotonic() < deadline, "no span of the retry"
        time.sleep(0.2)
        replays = [s for s in stack.sink.all_spans() if s.attributes.get("cachemesh.replayed")]
        replays = [s for s in replays if s.attributes.get("cachemesh.request_id") == request_id]
    (replay,) = replays
    assert replay.service == "router" and replay.trace_id != first.trace_id
    assert replay.attributes["cachemesh.tenant"] == "tenant-a"
    assert replay.attributes["cachemesh.served_by"] == pb.Layer.Name(first.served_by)
    assert "cachemesh.cost_nanos" not in replay.attributes  # the bill is the first call's span
    assert replay.links == ((first.trace_id, first.span_id),)
