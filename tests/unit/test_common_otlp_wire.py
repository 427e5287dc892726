"""SpanWire writes, byte for byte, what the OTLP exporter's own encoder writes."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.grpc import trace_exporter as sdk_trace_exporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
    set_span_in_context,
)

from services.common import otlp_wire
from services.common.otlp_wire import SpanWire, WireSpanExporter

ATTRIBUTES: dict[str, object] = {
    "cachemesh.tenant": "acme",
    "cachemesh.unicode": "café — 東京",
    "cachemesh.empty": "",
    "cachemesh.hit": True,
    "cachemesh.stored": False,
    "cachemesh.tokens": 17_000,
    "cachemesh.zero": 0,
    "cachemesh.negative": -5,
    "cachemesh.int64_max": (1 << 63) - 1,
    "cachemesh.int64_min": -(1 << 63),
    "cachemesh.similarity": 0.8734,
    "cachemesh.float_zero": 0.0,
    "cachemesh.replicas": ("a", "b"),
    "cachemesh.sizes": (1, 2, 3),
    "cachemesh.flags": (True, False),
}


def _spans(resource: Resource | None = None) -> tuple[ReadableSpan, ...]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=resource or Resource.create({"service.name": "router"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("cachemesh.router")
    other = provider.get_tracer("cachemesh.grpc", "1.2", schema_url="https://example/s")
    remote = SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0x00F067AA0BA902B7,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
        trace_state=TraceState([("vendor", "v1"), ("other", "x")]),
    )
    parent = set_span_in_context(NonRecordingSpan(remote))
    with tracer.start_as_current_span(
        "/cachemesh.v1.Gateway/Complete", parent, SpanKind.SERVER
    ) as s:
        s.set_attributes(ATTRIBUTES)  # type: ignore[arg-type]
        s.add_event("cachemesh.degraded", {"dependency": "prefix-cache", "n": 2})
        with other.start_as_current_span(
            "/cachemesh.v1.SemanticCache/Lookup",
            kind=SpanKind.CLIENT,
            links=[Link(remote, {"why": "retry"})],
        ) as c:
            c.set_attribute("rpc.grpc.status_code", 14)
            c.set_status(Status(StatusCode.ERROR, "UNAVAILABLE: connection refused"))
        with tracer.start_as_current_span("internal") as i:
            i.set_status(Status(StatusCode.OK))
    with tracer.start_as_current_span("") as unnamed:
        unnamed.set_attribute("cachemesh.tenant", "acme")  # the cached encoding, reused
    return memory.get_finished_spans()


def _official(spans: Sequence[ReadableSpan]) -> bytes:
    return encode_spans(spans).SerializeToString()


def test_the_bytes_are_the_exporters() -> None:
    spans = _spans()
    wire = SpanWire()
    assert wire.encode(spans) == _official(spans)
    assert wire.encode(spans) == _official(spans)  # again, from the caches


def test_spans_of_several_resources_and_scopes_group_as_the_exporter_groups_them() -> None:
    first = _spans(Resource.create({"service.name": "router"}))
    second = _spans(Resource.create({"service.name": "semantic-cache"}, "https://example/r"))
    mixed = [first[0], second[0], first[1], second[2], first[3]]
    assert SpanWire().encode(mixed) == _official(mixed)


def test_the_request_is_the_exporters_message() -> None:
    spans = _spans()
    assert SpanWire().request(spans) == encode_spans(spans)


def test_an_attribute_the_exporter_cannot_encode_is_skipped_as_it_skips_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    with provider.get_tracer("t").start_as_current_span("s") as span:
        span.set_attribute("ok", "kept")
        span._attributes["too_big"] = 1 << 64  # type: ignore[attr-defined]  # past int64
        span.set_attribute("lone_surrogate", "bad \ud800 text")  # not UTF-8 encodable
        span.set_attribute("bad \udfff key", "kept value")
    spans = memory.get_finished_spans()
    assert SpanWire().encode(spans) == _official(spans)
    assert "too_big" in caplog.text and "lone_surrogate" in caplog.text


def test_the_exporter_sends_what_the_wire_encodes(monkeypatch: pytest.MonkeyPatch) -> None:
    # the SDK's encoder gives the same message, 2-3 times slower, on the export thread beside
    # the requests' (an override lost once: the router's CPU per traced hit rose 11%): the
    # exporter must not call it
    spans = _spans()
    official = encode_spans(spans)

    def sdk_encoder(_: object) -> None:
        raise AssertionError("the exporter encoded with the SDK's encode_spans, not SpanWire")

    monkeypatch.setattr(sdk_trace_exporter, "encode_spans", sdk_encoder)
    exporter = WireSpanExporter(endpoint="http://127.0.0.1:9", insecure=True)
    try:
        assert exporter._translate_data(spans) == official
    finally:
        exporter.shutdown(timeout_millis=0)


def test_attributes_are_read_from_the_sdks_dict_not_one_mapping_lookup_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Through ``span.attributes`` (a view of the SDK's Python mapping) every attribute cost
    two calls more, on the export thread that shares the service's GIL."""
    spans = _spans()
    looked_up: list[str] = []
    lookup = BoundedAttributes.__getitem__

    def counted(self: BoundedAttributes, key: str) -> object:
        looked_up.append(key)
        return lookup(self, key)

    monkeypatch.setattr(BoundedAttributes, "__getitem__", counted)
    assert SpanWire().encode(spans) == _official_unpatched(spans, monkeypatch, lookup)
    assert not set(looked_up) & set(ATTRIBUTES)  # (events', links', the resource's: some)


def test_a_status_seen_before_is_not_encoded_again(monkeypatch: pytest.MonkeyPatch) -> None:
    spans = _spans()
    wire = SpanWire()
    first = wire.encode(spans)
    encoded: list[object] = []
    monkeypatch.setattr(otlp_wire, "_encode_status", lambda status: encoded.append(status))
    assert wire.encode(spans) == first
    assert encoded == []


def _official_unpatched(
    spans: Sequence[ReadableSpan],
    monkeypatch: pytest.MonkeyPatch,
    lookup: object,
) -> bytes:
    with monkeypatch.context() as m:
        m.setattr(BoundedAttributes, "__getitem__", lookup)
        return _official(spans)
