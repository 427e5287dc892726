"""OpenTelemetry set-up from the standard ``OTEL_*`` variables.

``OTEL_SERVICE_NAME`` names the service (each service passes its own default);
``OTEL_TRACES_EXPORTER`` is ``otlp`` (OTLP over gRPC to ``OTEL_EXPORTER_OTLP_ENDPOINT``),
``console`` or ``none``; with ``none`` or ``OTEL_SDK_DISABLED=true`` no span is recorded (the
trace context still flows: responses and logs carry a trace id). OTLP is gRPC only
(``OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL`` other than ``grpc`` is refused); plaintext or TLS
follows ``OTEL_EXPORTER_OTLP_(TRACES_)INSECURE`` for an endpoint without a scheme. A
``service.name`` in ``OTEL_RESOURCE_ATTRIBUTES`` names the service when ``OTEL_SERVICE_NAME``
does not. Where callers from outside come in (the router's Gateway, the HTTP front: ``edge``),
a received request is traced whatever its caller's ``traceparent`` says about sampling
(``EdgeSampler``), unless ``OTEL_TRACES_SAMPLER`` names a sampler of the operator's. The
batch processor's ``OTEL_BSP_*`` variables and the export timeout
(``OTEL_EXPORTER_OTLP_(TRACES_)TIMEOUT``, seconds) are read and checked here, all before the
exporter is built (a value the SDK cannot use stops the start naming it), and so are the
export's headers (``OTEL_EXPORTER_OTLP_(TRACES_)HEADERS``, the collector's credentials, never
shown); the exporter reads the rest of its ``OTEL_EXPORTER_OTLP_*`` variables itself.

A service's last stop step is ``stop_tracing``: the spans still queued are exported for at most
``TRACING_STOP_S``, off the event loop; what a collector has not taken by then is dropped.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import re
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    SamplingResult,
)
from opentelemetry.trace import Link, SpanKind, TraceState
from opentelemetry.util.types import Attributes
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from services.common.env import ConfigError, Env
from services.common.grace import GraceEnd
from services.common.rpc_tracing import ServerTracing

if TYPE_CHECKING:
    from services.common.otlp_wire import ExportHealth

_EXPORTERS = ("otlp", "console", "none")
# How long a stopping service waits for the collector to take its last spans: the SDK's own
# shutdown waits 30 s for its export thread, each export up to OTEL_EXPORTER_OTLP_TIMEOUT (10 s)
TRACING_STOP_S = 2.0
log = logging.getLogger("cachemesh.telemetry")


class _BatchSpans(BatchSpanProcessor):
    """The SDK's batch processor, whose shutdown waits at most ``TRACING_STOP_S``. With a
    collector that takes connections and never answers, the SDK's held every service's stop
    past its grace (SIGKILL, before semantic-cache's last snapshot). Past the bound the
    exporter's channel is closed (the export in flight ends) and the spans left are dropped.

    With an OTLP exporter's ``health``, a span that ends at a full queue is dropped here and
    counted (``ExportHealth.dropped``), as the specification's processor drops it (the SDK
    dropped the oldest one queued, with a "Queue full" WARNING every 20 s that named no
    processor): the SDK never writes that line for this processor, and another's (a logs
    processor's) are left alone."""

    def __init__(
        self, exporter: SpanExporter, health: ExportHealth | None = None, **options: Any
    ) -> None:
        super().__init__(exporter, **options)
        self._health = health  # the OTLP exporter's: told of each span dropped
        self._queued = threading.Lock()  # a span's check of the queue and its enqueueing
        # the SDK's batch processor's own (opentelemetry-sdk pinned in constraints.txt), read
        # once: a release that renames them stops the start here, not every span's end
        batch = self._batch_processor
        try:
            queue, bound = batch._queue, batch._max_queue_size
            self._emit, self._drop_counted = batch.emit, batch._metrics.drop_items
        except AttributeError as exc:
            raise RuntimeError(
                f"opentelemetry-sdk's BatchProcessor has no {exc.name!r}, which cachemesh's "
                "span processor reads (services/common/telemetry.py _BatchSpans): install "
                "the version constraints.txt pins, or port _BatchSpans to this one"
            ) from exc
        if not isinstance(queue, collections.deque) or not isinstance(bound, int):
            raise RuntimeError(
                "opentelemetry-sdk's BatchProcessor._queue / _max_queue_size are not a deque "
                "and an int (services/common/telemetry.py _BatchSpans): install the version "
                "constraints.txt pins, or port _BatchSpans to this one"
            )
        self._queue: collections.deque[Any] = queue
        self._max_queue_size = bound
        self._stopping = False  # shutdown begun: a span ending now is dropped, counted
        self._ended_in_stop = 0  # spans so dropped (for the stop's line)

    def on_end(self, span: ReadableSpan) -> None:
        """The SDK's, but a span that ends at a full queue dropped and counted
        (``ExportHealth``) when the exporter has a health."""
        if not (span.context and span.context.trace_flags.sampled):
            return
        if self._health is None:  # the console's: the SDK's own, its line included
            self._emit(span)
            return
        with self._queued:  # spans end on other threads too (``asyncio.to_thread``)
            if self._stopping:  # the SDK's processor would drop it uncounted
                self._ended_in_stop += 1
                self._health.dropped_at_shutdown(1)
                return
            if len(self._queue) < self._max_queue_size:
                self._emit(span)
                return
        self._drop_counted(1)  # the SDK's own count of drops (its internal metrics)
        self._health.dropped()

    def shutdown(self) -> None:
        """The SDK's, bounded by ``TRACING_STOP_S``; with an OTLP exporter's ``health`` the
        spans it leaves are counted (``dropped_at_shutdown``): those still queued past the
        bound (the SDK's processor stops exporting and left them uncounted), those ending
        once the stop began, and the export it cuts (``WireSpanExporter``). They reach
        ``/metrics`` in the stop's last milliseconds, after the last scrape but for a rare
        one, so its WARNING line says them, whenever there are any: queued, in the export
        cut (its size noted when it began: that export ends after the line, unwaited for),
        and ended since the stop began (a span ending after the line is counted only)."""
        began = time.monotonic()
        with self._queued:
            self._stopping = True  # read by ``on_end`` only with a health
        # the SDK's batch processor (opentelemetry-sdk pinned in constraints.txt): the only
        # shutdown that takes a timeout
        self._batch_processor.shutdown(timeout_millis=int(TRACING_STOP_S * 1000))
        late = (time.monotonic() - began) >= TRACING_STOP_S
        slow = (
            f"the collector did not take the last spans within {TRACING_STOP_S:.0f} s "
            "(OTEL_EXPORTER_OTLP_ENDPOINT not answering?): "
        )
        if self._health is None:  # the console's: nothing counted
            if late:
                log.warning("tracing: %sthose not sent are dropped", slow)
            return
        # popped one at a time, as the SDK's worker pops them: a span is either its
        # (exported, or counted by the exporter if that export fails) or counted here
        left = 0
        while True:
            try:
                self._queue.pop()
            except IndexError:
                break
            left += 1
        self._health.dropped_at_shutdown(left)
        cut = self._health.cut_in_export()
        with self._queued:
            ended = self._ended_in_stop
        if left + cut + ended or late:
            log.warning(
                "tracing: %sthe stop left %d spans unexported: %d still queued, %d in the "
                "export it cut, %d ended after it began (also counted in "
                'cachemesh_spans_dropped_total{reason="shutdown"}, which /metrics shows only '
                "to a scrape made during the stop)",
                slow if late else "",
                left + cut + ended,
                left,
                cut,
                ended,
            )


class EdgeSampler(Sampler):
    """The sampler of a service callers outside cachemesh reach (``OTEL_TRACES_SAMPLER``
    unset): a SERVER span, a request received, is recorded whatever its caller's
    ``traceparent`` says, in the caller's trace; every other span follows its parent (the
    SDK's default, ``ParentBased(ALWAYS_ON)``). With the default alone, a caller sampling its
    own traces (``-00`` on the requests it does not keep) had none of its requests' spans
    recorded in any service, though their responses and logs named a trace id. The calls the
    request makes carry the decision, so the services behind follow it, and a try the router
    sends unsampled on purpose (the billing outbox's) stays so."""

    def __init__(self) -> None:
        self._parent_based = ParentBased(ALWAYS_ON)

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        sampler = ALWAYS_ON if kind is SpanKind.SERVER else self._parent_based
        return sampler.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return "EdgeSampler{SERVER: AlwaysOnSampler, else: ParentBased{root:AlwaysOnSampler}}"


async def stop_tracing(provider: TracerProvider) -> None:
    """The last step of a service's stop: the spans still queued exported, for at most
    ``TRACING_STOP_S``, in a thread (the SDK's shutdown blocks: on the event loop it stopped
    the whole loop, the metrics endpoint's answers included, for as long as it took)."""
    await asyncio.to_thread(provider.shutdown)


class TracingProvider(TracerProvider):
    """The SDK's provider, with its OTLP exporter's ``ExportHealth`` (None: no OTLP export),
    whose counts of spans dropped ``SpanDrops`` exposes."""

    export_health: ExportHealth | None = None


class SpanDrops(Collector):
    """``cachemesh_spans_dropped_total{reason}`` on a service's metrics, read at each scrape
    from its OTLP exporter's ``ExportHealth``: ``queue_full``, spans that ended at a full
    queue (``OTEL_BSP_MAX_QUEUE_SIZE``: a collector slow, down, or a burst) and were dropped;
    ``export_failed``, spans of exports the collector did not take, the exporter's retries
    over (dropped for good); ``shutdown``, spans the service's stop left unexported (still
    queued past ``TRACING_STOP_S``, in the export it cut, or ending once it began: scraped
    only while the stop lasts, its log line says how many were queued). The SDK dropped the
    first two saying so at most in a log line (none once an outage's first was said), the
    third without a word. Nothing without an OTLP exporter (``none``: nothing to drop;
    ``console``: the SDK's own processor, uncounted). Spans are counted on the drop path only:
    a span that is queued pays nothing more."""

    def __init__(self, provider: TracerProvider) -> None:
        self._health = provider.export_health if isinstance(provider, TracingProvider) else None

    def collect(self) -> Iterator[Metric]:
        if self._health is None:
            return
        queue_full, export_failed = self._health.totals()
        dropped = CounterMetricFamily(
            "cachemesh_spans_dropped",
            "Spans this service dropped unexported: at a full queue (queue_full), in "
            "exports the collector did not take (export_failed), or left by its stop "
            "(shutdown)",
            labels=["reason"],
        )
        dropped.add_metric(["queue_full"], queue_full)
        dropped.add_metric(["export_failed"], export_failed)
        dropped.add_metric(["shutdown"], self._health.shutdown_total)
        yield dropped


def build_tracer_provider(
    environ: Mapping[str, str], default_service_name: str, *, edge: bool = False
) -> TracingProvider:
    """A provider configured from ``environ``; never installed as a global. ``edge``: the
    service callers outside cachemesh reach (``EdgeSampler``, unless ``OTEL_TRACES_SAMPLER``
    is set: the SDK applies that one)."""
    env = Env(environ)
    service_name = env.str(
        "OTEL_SERVICE_NAME", _resource_attribute(environ, "service.name") or default_service_name
    )
    resource = Resource.create({"service.name": service_name})
    exporter_name = env.str("OTEL_TRACES_EXPORTER", "otlp").lower()
    if exporter_name not in _EXPORTERS:
        raise ConfigError(
            f"OTEL_TRACES_EXPORTER must be one of {_EXPORTERS}, got {exporter_name!r}"
        )
    if env.bool("OTEL_SDK_DISABLED", False) or exporter_name == "none":
        # Nothing leaves the process: record no span (their cost without a use), but keep
        # the trace context, so responses and logs still carry a trace id and the calls
        # still carry it to the next service.
        return TracingProvider(resource=resource, sampler=ALWAYS_OFF)
    sampler = EdgeSampler() if edge and "OTEL_TRACES_SAMPLER" not in environ else None
    provider = TracingProvider(resource=resource, sampler=sampler)
    # every setting read before the exporter is built: a refused one left the exporter's log
    # filter installed and its channel open
    batch = _batch_settings(env)
    exporter: SpanExporter | None = None
    health: ExportHealth | None = None
    if exporter_name == "otlp":
        from services.common.otlp_wire import WireSpanExporter

        for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
            protocol = environ.get(name)
            if protocol is not None:
                if protocol.strip().lower() != "grpc":
                    raise ConfigError(
                        f"{name} must be grpc (cachemesh exports OTLP over gRPC, port 4317 "
                        f"by default), got {protocol.strip()[:40]!r}"
                    )
                break
        endpoint = env.str(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            env.str("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317"),
        )
        problem = _endpoint_error(endpoint)
        if problem:
            named = (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
                if env.optional_str("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") is not None
                else "OTEL_EXPORTER_OTLP_ENDPOINT"
            )
            raise ConfigError(
                f"{named}: {problem}, got {_shown_endpoint(endpoint)!r} (expected "
                "http://host:port, https://host:port, host:port or a gRPC target such as "
                "unix:///path/otel.sock)"
            )
        query_warning = _query_warning(endpoint)
        if query_warning:
            log.warning("%s", query_warning)
        insecure = _insecure(env, endpoint)
        timeout_s = _export_timeout_s(environ)
        headers = _export_headers(environ)
        exporter = WireSpanExporter(
            endpoint=endpoint,
            insecure=insecure,
            channel_options=otlp_channel_options(endpoint),
            timeout=timeout_s,
            headers=headers,  # the settings' only: none is none, not os.environ's
        )
        health = exporter.health
        provider.export_health = health
    elif exporter_name == "console":
        exporter = ConsoleSpanExporter()
    if exporter is not None:
        provider.add_span_processor(
            _BatchSpans(exporter, health, **asdict(batch))  # the SDK's own keyword names
        )
    return provider


@dataclass(frozen=True)
class BatchSettings:
    """The batch processor's settings, named as ``BatchSpanProcessor``'s keywords."""

    max_queue_size: int
    max_export_batch_size: int
    schedule_delay_millis: int
    export_timeout_millis: int


def _batch_settings(env: Env) -> BatchSettings:
    """The batch processor's ``OTEL_BSP_*`` settings (the SDK's defaults), read here: the SDK
    read them itself, an unreadable ``OTEL_BSP_MAX_QUEUE_SIZE`` (``abc``) taken as 2048 with an
    ERROR traceback, and a 0 stopping the start with "max_queue_size must be a positive
    integer." naming no variable. The queue bounds the spans a service holds while its
    collector does not take them."""
    queue = env.count("OTEL_BSP_MAX_QUEUE_SIZE", 2048, minimum=1)
    batch = env.count("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", min(512, queue), minimum=1)
    if batch > queue:
        raise ConfigError(
            f"OTEL_BSP_MAX_EXPORT_BATCH_SIZE ({batch}) must be at most OTEL_BSP_MAX_QUEUE_SIZE "
            f"({queue})"
        )
    return BatchSettings(
        max_queue_size=queue,
        max_export_batch_size=batch,
        schedule_delay_millis=env.count("OTEL_BSP_SCHEDULE_DELAY", 5000, minimum=1),
        # the Python SDK's processor does not use it (an export's bound is the exporter's
        # timeout); 0 is the specification's "no limit"
        export_timeout_millis=env.count("OTEL_BSP_EXPORT_TIMEOUT", 30000, minimum=0),
    )


# the longest export timeout taken: OTEL_EXPORTER_OTLP_TIMEOUT is milliseconds in the
# specification (10000) but seconds in the Python SDK, which cachemesh follows
EXPORT_TIMEOUT_MAX_S = 600.0


def _export_timeout_s(environ: Mapping[str, str]) -> float:
    """How long one export may wait for the collector (``OTEL_EXPORTER_OTLP_TRACES_TIMEOUT``,
    else ``OTEL_EXPORTER_OTLP_TIMEOUT``; seconds, as the Python SDK reads them; 10 by
    default): the exporter's own reading stopped the start with "could not convert string to
    float" naming no variable, and took a 0 as unset. The traces' one set but blank is refused:
    the exporter float()s it whatever its argument (the same message). Above
    ``EXPORT_TIMEOUT_MAX_S`` is refused as milliseconds, the specification's unit (an export
    would wait 2.8 hours for 10000)."""
    env = Env(environ)
    name = "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"
    raw = environ.get(name)
    if raw is not None and not raw.strip():
        raise ConfigError(
            f"{name} is set but blank: unset it, or give a number of seconds (the "
            "OpenTelemetry exporter reads it as a number even so)"
        )
    if raw is None:
        name = "OTEL_EXPORTER_OTLP_TIMEOUT"
    seconds = env.seconds(name, 10.0, minimum=None)
    if seconds <= 0:
        raise ConfigError(f"{name} must be a number of seconds above 0, got {seconds:g}")
    if seconds > EXPORT_TIMEOUT_MAX_S:
        raise ConfigError(
            f"{name} is seconds in the Python SDK (milliseconds in the OpenTelemetry "
            f"specification): {seconds:g} looks like milliseconds (an export would wait "
            f"{seconds / 3600:.1f} h); give seconds, at most {EXPORT_TIMEOUT_MAX_S:g} "
            f"(e.g. {seconds / 1000:g})"
        )
    return seconds


# gRPC's own target schemes (its resolvers): the exporter hands such a target to gRPC as
# written (it has no host:port of its own to check), as it did before the check below
GRPC_TARGET_SCHEMES = frozenset(
    {"dns", "ipv4", "ipv6", "unix", "unix-abstract", "vsock", "xds", "google-c2p"}
)


def _endpoint_error(endpoint: str) -> str:
    """What keeps gRPC from dialling ``endpoint`` as written ("" = nothing): it read a port past
    65535 modulo 65536 (:99999 exported to :34463) and took a host with a space, failing at
    every export. Only the host:port forms are checked (``http://``, ``https://``, none); a
    gRPC target (``unix:///run/otel.sock``, ``dns:///collector:4317``, ``ipv4:...``) is gRPC's
    to read."""
    if endpoint.partition(":")[0].lower() in GRPC_TARGET_SCHEMES:
        return ""
    target = endpoint if "://" in endpoint else f"//{endpoint}"
    try:
        parts = urllib.parse.urlsplit(target)
        if "@" in parts.netloc:  # the authority's: '@' in a path or a query is not a user part
            # the exporter dials the netloc whole ("address lookup failed for user:pass@host"),
            # every export dropped while the service ran as if traced; checked before the
            # port, whose errors quote a password's piece ("Port could not be cast to integer
            # value as 'S3cret'")
            return (
                "a user part (user:password@) is not sent over OTLP/gRPC (every export would "
                "fail): give credentials in OTEL_EXPORTER_OTLP_HEADERS, e.g. "
                "authorization=Basic%20<base64 of user:password>"
            )
        port = parts.port
    except ValueError as exc:  # "Port out of range 0-65535", a bracket left open
        # "Port could not be cast to integer value as 'S3cret'" quotes what stood after the
        # last ':' of the authority (a password's piece, with a '/' or '?' in the password)
        reason = "its port is not a number" if "cast to integer" in str(exc) else str(exc)
        return f"not a host:port ({reason})"
    if parts.query and "://" not in endpoint:
        # without a scheme the exporter hands gRPC the endpoint whole, query included
        return (
            "a query (?...) is not sent over OTLP/gRPC: give credentials in "
            "OTEL_EXPORTER_OTLP_HEADERS"
        )
    if any(c.isspace() for c in parts.netloc):
        return "the host:port holds whitespace"
    if not parts.hostname:
        return "no host"
    if port == 0:
        return "port 0"
    return ""


def _query_warning(endpoint: str) -> str:
    """What to say of an http(s) endpoint's query ("" = none): the exporter dials its host:port
    and drops the query, so the export goes on without it (a collector's ``?tenant=a`` was
    never sent); once at the start, the endpoint shown without the query."""
    if endpoint.partition("://")[0].lower() not in ("http", "https"):
        return ""
    if not urllib.parse.urlsplit(endpoint).query:
        return ""
    return (
        f"tracing: the OTLP endpoint {_shown_endpoint(endpoint)!r} has a query: the query is "
        "not sent over OTLP/gRPC (spans go to its host:port without it); credentials go in "
        "OTEL_EXPORTER_OTLP_HEADERS"
    )


def _shown_endpoint(endpoint: str) -> str:
    """``endpoint`` for a message: its user part and query (where a password or a token
    goes) hidden, whether it parses or not (a refused one may not), at most 80 characters.
    The user part ends at the last '@' (a password may hold '/', '?' and '@')."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        scheme, rest = "", endpoint
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    if "?" in rest:
        rest = rest.partition("?")[0] + "?***"
    return f"{scheme}{sep}{rest}"[:80]


# the exporter's header variables, the traces' one first (the SDK's order)
HEADER_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS")


def _export_headers(environ: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The headers sent with each export (``OTEL_EXPORTER_OTLP_TRACES_HEADERS``, else
    ``OTEL_EXPORTER_OTLP_HEADERS``: comma-separated ``name=value`` pairs, values
    URL-encoded), read as the exporter reads them and handed to it. The exporter, reading
    them itself, logged a pair it could not read at WARNING, whole (the collector's key in
    the service's log), dropped it and exported without it: such a pair stops the start,
    named by its position and name, never by its value."""
    from opentelemetry.util.re import (  # the exporter's own grammar
        _DELIMITER_PATTERN,
        _LIBERAL_HEADER_PATTERN,
        parse_env_headers,
    )

    for name in HEADER_VARIABLES:
        raw = environ.get(name)
        if raw:
            break
    else:
        return ()
    pairs = [pair.strip() for pair in _DELIMITER_PATTERN.split(raw)]
    headers: dict[str, str] = {}  # as the exporter's parse of the whole: the last pair of a name
    for number, pair in enumerate(pairs, 1):
        if not pair:
            continue
        if not _LIBERAL_HEADER_PATTERN.fullmatch(pair):
            key, equals, _ = pair.partition("=")
            named = _shown_name(key.strip()) if equals else ""
            colon = "; written name: value? write name=value" if not equals and ":" in pair else ""
            raise ConfigError(
                f"{name}: header {number} of {len(pairs)}{named} is not name=value (a name of "
                "letters, digits and -_.; the value URL-encoded, e.g. %2C for a comma; pairs "
                f"separated by commas){colon}; its value is not shown (it may be a secret)"
            )
        # as the exporter decodes it (the name lowercased, and URL-decoded when the pair is
        # URL-encoded): gRPC sends printable ASCII alone in a header, and refused every
        # export of a value decoding to more ("Invalid metadata", each export)
        for key, value in parse_env_headers(pair, liberal=True).items():
            if not _printable_ascii(key) or not _printable_ascii(value):
                what = "name" if not _printable_ascii(key) else "value"
                raise ConfigError(
                    f"{name}: header {number} of {len(pairs)}{_shown_name(key)} has a {what} "
                    "that is not printable ASCII once URL-decoded (a %XX escape of a byte over "
                    "%7E or under %20, a character outside ASCII), which gRPC cannot send: "
                    "every export would fail; its value is not shown (it may be a secret)"
                )
            if key.endswith("-bin"):
                # gRPC's binary metadata: it takes bytes, and refused every export of a
                # string ("TypeError: Binary metadata key ... expected bytes")
                raise ConfigError(
                    f"{name}: header {number} of {len(pairs)}{_shown_name(key)} has a name "
                    "ending in -bin, which gRPC sends as binary metadata (bytes, not the text "
                    "given here): every export would fail; rename the header (or drop it); its "
                    "value is not shown (it may be a secret)"
                )
            headers[key] = value
    return tuple(headers.items())


def _shown_name(key: str) -> str:
    """A header's name for a message, `` ('name')``, when it is a plain one (letters, digits
    and -_., at most 64): else "" (it may be a secret written where the name goes)."""
    return f" ({key!r})" if re.fullmatch(r"[A-Za-z0-9._-]{1,64}", key) else ""


def _printable_ascii(text: str) -> bool:
    """What a gRPC header name or value may hold: printable ASCII (space to '~')."""
    return all(" " <= c <= "~" for c in text)


def otlp_channel_options(endpoint: str) -> tuple[tuple[str, int], ...]:
    """A collector on loopback is dialled directly, whatever ``https_proxy`` / ``grpc_proxy``
    say (gRPC follows them by default, loopback included: Docker sets them in every container
    when its client has proxies): no proxy can reach this host's loopback. A remote collector
    follows the proxy variables (and ``no_proxy``), as the operator set them."""
    target = endpoint if "://" in endpoint else f"//{endpoint}"
    host = urllib.parse.urlsplit(target).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    return (("grpc.enable_http_proxy", 0),) if loopback else ()


# gRPC's targets of a socket on this host (a node-local agent's): plaintext unless
# OTEL_EXPORTER_OTLP_(TRACES_)INSECURE says otherwise
LOCAL_SOCKET_SCHEMES = frozenset({"unix", "unix-abstract", "vsock"})


def _insecure(env: Env, endpoint: str) -> bool:
    """Plaintext or TLS, as the OTLP exporter decides it: https is TLS; otherwise
    ``OTEL_EXPORTER_OTLP_(TRACES_)INSECURE`` when set; otherwise plaintext for http and for a
    local socket (``unix:``, ``unix-abstract:``, ``vsock:``: dialled with TLS, a plaintext
    node-local agent received no span), TLS for the rest (an endpoint without a scheme,
    ``collector:4317``, or ``dns:///collector:4317``, is TLS unless told it is insecure)."""
    scheme = endpoint.split("://", 1)[0].lower() if "://" in endpoint else ""
    if scheme == "https":
        return False
    for name in ("OTEL_EXPORTER_OTLP_TRACES_INSECURE", "OTEL_EXPORTER_OTLP_INSECURE"):
        if env.optional_str(name) is not None:
            return env.bool(name, False)
    return scheme == "http" or endpoint.partition(":")[0].lower() in LOCAL_SOCKET_SCHEMES


def _resource_attribute(environ: Mapping[str, str], key: str) -> str | None:
    """``key`` in ``OTEL_RESOURCE_ATTRIBUTES`` (``k=v,k2=v2``, values percent-encoded)."""
    for pair in environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        name, sep, value = pair.partition("=")
        if sep and name.strip() == key and value.strip():
            return urllib.parse.unquote(value.strip())
    return None


def server_interceptors(
    provider: TracerProvider, grace_end: GraceEnd | None = None, callers_baggage: bool = True
) -> list[grpc.aio.ServerInterceptor]:
    """A SERVER span for each call received (the router's CLIENT spans: ``grpc_adapters``);
    ``grace_end``: the server's (``ServiceSpec.grace_end``), so that a call its shutdown cuts
    is an UNAVAILABLE error, not a caller's cancel; ``callers_baggage``: False where tenants
    call (``ServerTracing``)."""
    return [ServerTracing(provider.get_tracer("cachemesh.grpc"), grace_end, callers_baggage)]


def current_trace_id() -> str:
    """The current span's trace id as 32 hex digits, or "" when there is none."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def current_span_id() -> str:
    """The current span's id as 16 hex digits, or "" when there is none."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.span_id, "016x") if ctx.is_valid else ""
