"""OTLP trace export at a fraction of the exporter's encoding cost.

The OTLP exporter builds one protobuf object per span, attribute and value in Python before it
serialises them: about 90 us a span here, on the thread that shares the service's GIL, which
made encoding a fifth of the router's CPU on a traced cache hit. ``SpanWire`` writes the same
bytes directly — the protobuf wire format of ``ExportTraceServiceRequest``, field by field in
field-number order as the serialiser does — and keeps each distinct string or boolean
attribute's encoding, since most (tenant, model, tier, method, status) repeat from span to span.
The exporter parses those bytes back into its request (in C) and sends it as before, retries
and compression included. Events, links and values other than str / bool / int / float go
through the exporter's own encoders; a test holds the bytes equal to the exporter's for every
kind of span the services make.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

import grpc
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.exporter.otlp.proto.common._internal import (
    _encode_instrumentation_scope,
    _encode_key_value,
    _encode_resource,
)
from opentelemetry.exporter.otlp.proto.common._internal.trace_encoder import (
    _SPAN_KIND_MAP,
    _encode_events,
    _encode_links,
    _encode_status,
)
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import SpanFlags
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.trace import SpanContext

from services.common.clock import Clock, MonotonicClock, Throttle
from services.common.env import redacted_url

log = logging.getLogger(__name__)
_FIXED64 = struct.Struct("<Q")
_DOUBLE = struct.Struct("<d")
_FIXED32 = struct.Struct("<I")
_HAS_IS_REMOTE = SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
_IS_REMOTE = SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_CACHED_MAX = 8192  # distinct (key, value) encodings kept; the cache starts over when full


_SMALL = tuple(bytes((i,)) for i in range(0x80))  # the one-byte varints


def _varint(value: int) -> bytes:
    if 0 <= value < 0x80:
        return _SMALL[value]
    if value < 0:
        value += 1 << 64  # int64: two's complement, ten bytes
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(tag: int, payload: bytes) -> bytes:
    """A length-delimited field: its tag (< 128: every tag here), the length, the payload."""
    size = len(payload)
    if size < 0x80:
        return bytes((tag, size)) + payload
    return bytes((tag,)) + _varint(size) + payload


class SpanWire:
    """Encodes SDK spans as an OTLP ``ExportTraceServiceRequest``'s bytes."""

    def __init__(self) -> None:
        self._attributes: dict[tuple[str, type, object], bytes] = {}
        self._statuses: dict[tuple[object, str | None], bytes] = {}
        self._resources: dict[object, bytes] = {}
        self._scopes: dict[object, bytes] = {}

    def request(self, spans: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
        return ExportTraceServiceRequest.FromString(self.encode(spans))

    def encode(self, spans: Sequence[ReadableSpan]) -> bytes:
        # grouped by resource, then scope, each in order of first appearance (as the exporter)
        grouped: dict[object, dict[object, list[bytes]]] = {}
        last: object = None  # a Resource hashes its attributes' JSON: once a run of spans
        scopes: dict[object, list[bytes]] = {}
        for span in spans:
            if span.resource is not last or not grouped:
                last = span.resource
                scopes = grouped.setdefault(last, {})
            scopes.setdefault(span.instrumentation_scope or None, []).append(self.span(span))
        out = bytearray()
        for resource, scopes in grouped.items():
            body = bytearray(self._resource(resource))
            for scope, encoded in scopes.items():
                scope_body = bytearray(self._scope(scope))
                for span_bytes in encoded:
                    scope_body += _field(0x12, span_bytes)
                schema = getattr(scope, "schema_url", None) if scope is not None else None
                if schema:
                    scope_body += _field(0x1A, schema.encode())
                body += _field(0x12, bytes(scope_body))
            schema_url = getattr(resource, "schema_url", "")
            if schema_url:
                body += _field(0x1A, schema_url.encode())
            out += _field(0x0A, bytes(body))
        return bytes(out)

    def span(self, span: ReadableSpan) -> bytes:
        context = span.get_span_context()
        assert context is not None  # a finished SDK span always has one
        out = bytearray(b"\x0a\x10")
        out += context.trace_id.to_bytes(16, "big")
        out += b"\x12\x08"
        out += context.span_id.to_bytes(8, "big")
        if context.trace_state:
            state = ",".join(f"{k}={v}" for k, v in context.trace_state.items())
            out += _field(0x1A, state.encode())
        parent = span.parent
        if parent is not None:
            out += b"\x22\x08" + parent.span_id.to_bytes(8, "big")
        if span.name:
            out += _field(0x2A, span.name.encode())
        kind = _SPAN_KIND_MAP[span.kind]
        if kind:
            out += b"\x30" + _varint(kind)
        if span.start_time:
            out += b"\x39" + _FIXED64.pack(span.start_time)
        if span.end_time:
            out += b"\x41" + _FIXED64.pack(span.end_time)
        for key, value in _attribute_items(span):
            out += self._key_value(key, value)
        if span.dropped_attributes:
            out += b"\x50" + _varint(span.dropped_attributes)
        events = span.events
        if events:
            for event in _encode_events(events) or ():
                out += _field(0x5A, event.SerializeToString())
        if span.dropped_events:
            out += b"\x60" + _varint(span.dropped_events)
        links = span.links
        if links:
            for link in _encode_links(links) or ():
                out += _field(0x6A, link.SerializeToString())
        if span.dropped_links:
            out += b"\x70" + _varint(span.dropped_links)
        out += self._status(span)
        out += b"\x85\x01" + _FIXED32.pack(_flags(parent))
        return bytes(out)

    def _status(self, span: ReadableSpan) -> bytes:
        """The span's ``status`` field (tag 15), kept by code and description: nearly every
        span's is the same (unset, or an RPC's error code without details)."""
        status = span.status
        if status is None:
            return b""
        key = (status.status_code, status.description)
        if (encoded := self._statuses.get(key)) is None:
            message = _encode_status(status)
            encoded = b"" if message is None else _field(0x7A, message.SerializeToString())
            if len(self._statuses) >= _CACHED_MAX:
                self._statuses.clear()
            self._statuses[key] = encoded
        return encoded

    def _key_value(self, key: str, value: Any) -> bytes:
        """One attribute as a repeated ``KeyValue`` field of the span (tag 9). A string's,
        boolean's or integer's encoding is kept: most of them (tenant, model, tier, method,
        status code, a hit's zero cost) repeat from span to span. Not a float's: -0.0 and 0.0
        are one key of a dict and two encodings."""
        kind = type(value)
        cacheable = kind is str or kind is bool or kind is int
        if cacheable and (cached := self._attributes.get((key, kind, value))) is not None:
            return cached
        try:
            if kind is str:
                any_value = _field(0x0A, value.encode())
            elif kind is bool:
                any_value = b"\x10\x01" if value else b"\x10\x00"
            elif kind is int and _INT64_MIN <= value <= _INT64_MAX:
                any_value = b"\x18" + _varint(value)
            elif kind is float:
                any_value = b"\x21" + _DOUBLE.pack(value)
            else:  # arrays, bytes, mappings, None, ints past int64
                return _exporters(key, value)
            encoded = _field(0x4A, _field(0x0A, key.encode()) + _field(0x12, any_value))
        except UnicodeEncodeError:  # a lone surrogate: dropped alone, as the exporter does
            return _exporters(key, value)
        if cacheable:
            if len(self._attributes) >= _CACHED_MAX:
                self._attributes.clear()
            self._attributes[(key, kind, value)] = encoded
        return encoded

    def _resource(self, resource: Any) -> bytes:
        """The ResourceSpans' ``resource`` field (tag 1), encoded once per resource."""
        if (encoded := self._resources.get(resource)) is None:
            message = _encode_resource(resource).SerializeToString()
            encoded = self._resources[resource] = _field(0x0A, message)
        return encoded

    def _scope(self, scope: Any) -> bytes:
        """The ScopeSpans' ``scope`` field (tag 1; present even for no scope), once per scope."""
        if (encoded := self._scopes.get(scope)) is None:
            message = _encode_instrumentation_scope(scope).SerializeToString()
            encoded = self._scopes[scope] = _field(0x0A, message)
        return encoded


def _attribute_items(span: ReadableSpan) -> Iterable[tuple[str, Any]]:
    """The span's attributes, in order, from the SDK's own dict when it holds one (the
    ``BoundedAttributes`` of opentelemetry-sdk, pinned in constraints.txt): through
    ``span.attributes``, a read-only view of a Python mapping, each one took two calls more."""
    held = getattr(span, "_attributes", None)
    if isinstance(held, BoundedAttributes):
        return held._dict.items()
    return (span.attributes or {}).items()


def _exporters(key: str, value: Any) -> bytes:
    """The attribute by the exporter's own encoder; one it cannot encode is logged and
    skipped, as the exporter skips it (the rest of the span, and the batch, still go)."""
    try:
        return _field(0x4A, _encode_key_value(key, value).SerializeToString())
    except Exception as error:
        log.exception("Failed to encode key %s: %s", key, error)
        return b""


def _flags(parent: SpanContext | None) -> int:
    if parent is not None and parent.is_remote:
        return int(_HAS_IS_REMOTE | _IS_REMOTE)
    return int(_HAS_IS_REMOTE)


# the logger of the SDK's lines about a collector not taking spans: the exporter's, a line for
# each try of each export ("Transient error ... retrying" and "Failed to export ...": its
# DuplicateFilter, which passes a line unlike the one before, lets both through each time). It
# is every OTLP/gRPC exporter's of the process (another provider's, the metrics' or logs'):
# only the lines of our own export, on its thread while it runs, are ours
EXPORTER_LOGGER = "opentelemetry.exporter.otlp.proto.grpc.exporter"
_EXPORT_FAILED = ("Transient error", "Failed to export")
# the gRPC codes no retry mends: the collector answers, and refuses what it is sent or how
# (credentials in the headers, TLS, a receiver without traces); the exporter does not retry
# them either. Said at ERROR, pointing at the headers and TLS rather than the endpoint
REFUSALS = frozenset(
    {"UNAUTHENTICATED", "PERMISSION_DENIED", "INVALID_ARGUMENT", "UNIMPLEMENTED", "UNKNOWN"}
)


def _cause(code: str) -> str:
    """What an outage's lines tell apart: each refusal, a failure with no status ("error"),
    and the statuses the exporter retries as one (a collector down gives UNAVAILABLE, or
    DEADLINE_EXCEEDED when a retry runs out of the export's time: from export to export)."""
    return code if code in REFUSALS or code == "error" else "unreachable"


def _url_secrets(url: str) -> list[str]:
    """What of a URL's user part and query may be a secret (longest first), as gRPC's own
    errors quote the target: "address lookup failed for user:pass@host:port"."""
    try:
        parts = urlsplit(url)
        found = [parts.username, parts.password, parts.query]
    except ValueError:
        return []
    return sorted((part for part in found if part), key=len, reverse=True)


# a header value (or a word of it: "Bearer <token>") this long or longer is hidden where a
# collector's details quote it; a shorter one ("1", "true") is no credential, and hiding it
# would blot out every such piece of the details
HIDDEN_HEADER_CHARS = 8
# spans dropped at a full queue are said at the first and again at most this often while they
# go on (with how many since the last line): the line was said once an outage only, and a
# collector slow but answering (a burst) is never an outage, so the first burst's line was the
# process's only one
DROPPED_LINE_EVERY_S = 60.0


def _header_secrets(headers: Sequence[tuple[str, str]]) -> list[str]:
    """The export headers' values, and each word of them, that may be a credential."""
    found: set[str] = set()
    for _, value in headers:
        found.update(p for p in (value, *value.split()) if len(p) >= HIDDEN_HEADER_CHARS)
    return sorted(found, key=len, reverse=True)


class ExportHealth(logging.Filter):
    """Whether the collector takes spans, said once an outage and again when its cause
    changes. With the collector down or not answering, the SDK wrote a WARNING or an ERROR
    line for each try of each export (13 to 15 in each traced service's log in 45 s, about
    1,100 an hour each) and a "Queue full" WARNING every 20 s, none saying when the collector
    took spans again nor how many were lost. Installed first among the filters of the
    exporter's logger (before the SDK's DuplicateFilter, which passes a line unlike the one
    before), it keeps the lines of our exports out of the logs (those written on the export's
    thread between ``begin`` and ``end``: another exporter's are left alone) and says instead
    that the collector does not take spans (the gRPC status and details of the export's last
    try), again when a later export fails for another cause (``_cause``: UNAVAILABLE, then
    UNAUTHENTICATED, the new cause was never said), and that spans are dropped at a full
    queue (``dropped``, counted by ``_BatchSpans``, which drops them itself: at the first, then
    at most every ``DROPPED_LINE_EVERY_S`` while no outage is said); then once that it takes
    them again, with how many exports failed and spans were dropped meanwhile. ``totals``:
    both counts since the start (``cachemesh_spans_dropped_total``).
    A status no retry mends (``REFUSALS``) is an ERROR naming the headers and TLS. Requests
    never wait on it: the batch processor's queue (``OTEL_BSP_MAX_QUEUE_SIZE``) bounds what is
    held."""

    def __init__(
        self,
        endpoint: str,
        headers: Sequence[tuple[str, str]] = (),
        clock: Clock | None = None,
    ) -> None:
        """``headers``: the export's (the collector's credentials), whose values are hidden
        in the details said, as a collector may quote the key it refused; ``clock``: the
        bound of the dropped spans' line (``DROPPED_LINE_EVERY_S``)."""
        super().__init__()
        # as said in its lines: an http(s) URL without its user part nor query (a token
        # there reached the log), a gRPC target (host:port, dns:///...) as written
        scheme = endpoint.partition("://")[0].lower()
        self._endpoint = redacted_url(endpoint) if scheme in ("http", "https") else endpoint
        # hidden in the gRPC details it quotes too ("unknown API key hcaik_...")
        self._secrets = sorted(
            {*_url_secrets(endpoint), *_header_secrets(headers)}, key=len, reverse=True
        )
        self._lock = threading.Lock()
        self._failing = False
        self._said = ""  # the status of the outage's last line ("" before its first)
        self._code = ""  # this export's last try's gRPC status ("" none seen)
        self._reason = ""  # ... with the collector's details
        self._failed_exports = 0
        self._lost_spans = 0  # in the exports that failed
        self._dropped_spans = 0  # at a full queue
        # since the start, for the metrics (``totals``): never reset
        self._queue_full_total = 0
        self._export_failed_total = 0  # the spans of the exports that failed
        self._shutdown_total = 0  # left unexported by the stop (``dropped_at_shutdown``)
        self._cut_total = 0  # of which in exports the stop cut (``end``)
        self._exporting = 0  # the spans of the export in flight (``begin``), 0 between
        # the queue-full line: at most one an interval, counting the spans dropped at the
        # full queue since a line last counted them (it, or the collector's return's), and
        # whether one was said yet (the first says no count)
        self._drop_line = Throttle(clock or MonotonicClock(), round(DROPPED_LINE_EVERY_S * 1000))
        self._drop_said = False
        self._export_thread: int | None = None  # the thread of our export, while it runs

    def install(self) -> None:
        # first: the SDK's DuplicateFilter would hide a line unlike the one before
        logging.getLogger(EXPORTER_LOGGER).filters.insert(0, self)

    def uninstall(self) -> None:
        logging.getLogger(EXPORTER_LOGGER).removeFilter(self)

    def begin(self, spans: int) -> None:
        """Our export of ``spans`` starts on this thread: the exporter's lines written on it
        are ours until ``end`` (a thread's id is reused once it ends: matched only
        meanwhile); the last export's status is forgotten (a failure with no line of its own
        is not said as the one before's); its size is noted for the stop's line
        (``cut_in_export``: an export the stop cuts may end after that line)."""
        with self._lock:
            self._export_thread = threading.get_ident()
            self._code = self._reason = ""
            self._exporting = spans

    def end(self, cut: int) -> None:
        """The export ended; ``cut``: its spans, when it failed once the stop began (the
        export the stop cut, its channel closed): counted dropped at the shutdown here, at
        once with the export's size forgotten, so ``cut_in_export`` counts them once."""
        with self._lock:
            self._export_thread = None
            self._exporting = 0
            self._shutdown_total += cut
            self._cut_total += cut

    def cut_in_export(self) -> int:
        """For the stop's line, once the exporter is shut down: the spans of the exports the
        stop cut, those ended (counted) and the one still in flight (counted when it ends,
        on the SDK's worker thread, often after the line: the stop does not wait for it)."""
        with self._lock:
            return self._cut_total + self._exporting

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.msg if isinstance(record.msg, str) else ""
        if record.name != EXPORTER_LOGGER or not message.startswith(_EXPORT_FAILED):
            return True
        # the SDK's arguments: the try's gRPC status, and the collector's details last
        args = record.args if isinstance(record.args, tuple) else ()
        codes = [a.name for a in args if isinstance(a, grpc.StatusCode)]
        details = str(args[-1])[:200] if codes and args else ""
        with self._lock:
            if self._export_thread is None or record.thread != self._export_thread:
                return True  # another exporter's (another provider's, or another signal's)
            self._code = codes[0] if codes else ""
            self._reason = ": ".join([codes[0], details] if details else codes) or "error"
        return False

    @property
    def dropped_spans(self) -> int:
        """The spans dropped at the full queue since the last export taken (in this outage; 0
        once the collector is back)."""
        with self._lock:
            return self._dropped_spans

    def totals(self) -> tuple[int, int]:
        """Since the start: the spans dropped at a full queue, and those of the exports the
        collector did not take (the exporter's retries over: dropped for good)."""
        with self._lock:
            return self._queue_full_total, self._export_failed_total

    @property
    def shutdown_total(self) -> int:
        """Since the start: the spans the stop left unexported (``dropped_at_shutdown``)."""
        with self._lock:
            return self._shutdown_total

    def dropped_at_shutdown(self, spans: int) -> None:
        """``spans`` left unexported by the stop: still queued when its bound
        (``TRACING_STOP_S``) was over, or ending once it had begun (those of the export it
        cut: ``end``). Counted only: the stop's own line says it."""
        with self._lock:
            self._shutdown_total += spans

    def dropped(self) -> None:
        """A span dropped at the full queue (its batch processor's count): said at the first,
        then at most once every ``DROPPED_LINE_EVERY_S`` while spans are dropped, but not
        during an outage already said: its line says spans are dropped, and the collector's
        return counts those dropped at the full queue meanwhile (a line a minute a service
        otherwise, for as long as the collector is down)."""
        with self._lock:
            self._dropped_spans += 1
            self._queue_full_total += 1
            if self._failing:
                return  # counted by the collector's return's line (which clears the throttle)
            since = self._drop_line.due()
            if not since:
                return
            first, self._drop_said = not self._drop_said, True
        counted = "" if first else f", {since} since the last count of them said"
        log.warning(
            "tracing: the span queue is full (OTEL_BSP_MAX_QUEUE_SIZE), the collector at %s "
            "not taking spans as fast as they end: spans are dropped%s "
            "(cachemesh_spans_dropped_total; said again at most every %.0f s while it lasts)",
            self._endpoint,
            counted,
            DROPPED_LINE_EVERY_S,
        )

    def exported(self, taken: bool, spans: int) -> None:
        """An export's outcome (``spans`` in it): the first failure of an outage, a failure
        whose status differs from the last one said, and the first success after an outage,
        are each said once."""
        with self._lock:
            if not taken:
                self._failed_exports += 1
                self._lost_spans += spans
                self._export_failed_total += spans
                code = self._code or "error"
                if self._failing and _cause(code) == _cause(self._said):
                    return
                was, first = self._said, not self._failing
                self._failing, self._said = True, code
                reason = self._reason or "error"
                for secret in self._secrets:
                    reason = reason.replace(secret, "***")
            elif not self._failing:
                # a burst's drops, the collector taking spans (said by ``dropped``): not the
                # next outage's figure
                self._dropped_spans = 0
                return
            else:
                failed, lost, dropped = (
                    self._failed_exports,
                    self._lost_spans,
                    self._dropped_spans,
                )
                self._failing, self._said = False, ""
                self._failed_exports = self._lost_spans = self._dropped_spans = 0
                # counted by the line below: not again by the next queue-full line
                self._drop_line.clear_pending()
        if taken:
            log.warning(
                "tracing: the collector at %s takes spans again; dropped meanwhile: %d spans "
                "in %d exports it did not take, %d at a full queue",
                self._endpoint,
                lost,
                failed,
                dropped,
            )
            return
        since = "" if first else f", now; before: {was}"
        if code in REFUSALS:
            log.error(
                "tracing: the collector at %s refuses the spans (%s%s): a retry does not mend "
                "it; check the credentials in OTEL_EXPORTER_OTLP_(TRACES_)HEADERS, TLS "
                "(OTEL_EXPORTER_OTLP_(TRACES_)INSECURE, _CERTIFICATE) and that it receives "
                "OTLP traces; its spans are dropped, requests are served as before (said "
                "again if the cause changes, and when it takes spans)",
                self._endpoint,
                reason,
                since,
            )
        else:
            log.warning(
                "tracing: the collector at %s does not take spans (%s%s; "
                "OTEL_EXPORTER_OTLP_ENDPOINT): the spans it does not take are dropped, "
                "requests are served as before (said again if the cause changes, and when "
                "it is back)",
                self._endpoint,
                reason,
                since,
            )


class WireSpanExporter(OTLPSpanExporter):
    """The OTLP/gRPC span exporter with ``SpanWire`` as its encoder, whose collector's outages
    are said once each (``ExportHealth``, in place until the exporter is shut down and its
    last export, which the shutdown cuts, has ended: that one's line is not the outage's)."""

    def __init__(
        self,
        *,
        headers: Sequence[tuple[str, str]] = (),
        clock: Clock | None = None,
        **options: Any,
    ) -> None:
        """``headers``: exactly those sent with each export, none if empty. The SDK's exporter,
        given none, reads ``OTEL_EXPORTER_OTLP_(TRACES_)HEADERS`` from ``os.environ`` behind
        the service's settings (and sent them, unhidden in ``ExportHealth``'s lines): its
        reading is overwritten, so the settings are the only source. ``clock``: its
        ``ExportHealth``'s."""
        sent = tuple((str(name), str(value)) for name, value in headers)
        super().__init__(headers=sent, **options)
        self._headers = sent  # the SDK's ``headers or os.environ[...]`` undone
        self._wire = SpanWire()
        self._health = ExportHealth(str(options.get("endpoint", "")), sent, clock)
        self._health.install()
        self._state = threading.Lock()
        self._in_export = False
        self._stopping = False  # shutdown begun: a failed export's spans are the stop's drops
        self._closed = False

    @property
    def health(self) -> ExportHealth:
        return self._health

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self._health.begin(len(spans))
        with self._state:
            self._in_export = True
        result = SpanExportResult.FAILURE
        try:
            result = super().export(spans)
        finally:
            with self._state:
                self._in_export = False
                stopping, closed = self._stopping, self._closed
            # the export the stop cut (its channel closed), or one after it: its spans were
            # counted nowhere (nor was an export failing meanwhile: one count each)
            failed = result is not SpanExportResult.SUCCESS
            self._health.end(len(spans) if stopping and failed else 0)
            if closed:
                self._health.uninstall()
            if not stopping:
                self._health.exported(not failed, len(spans))
        return result

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        with self._state:  # before the channel is closed: the export it cuts sees it
            self._stopping = True
        try:
            super().shutdown(timeout_millis, **kwargs)
        finally:
            with self._state:
                self._closed = True
                exporting = self._in_export
            if not exporting:
                self._health.uninstall()

    def _translate_data(self, data: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
        # the SDK's export calls this for each batch: SpanWire's bytes, not the SDK's encoder
        return self._wire.request(data)
