"""The router's dependencies over gRPC: traced calls carrying the internal credential.

The only place the router's pipeline meets the transport: a failed call's
``grpc.aio.AioRpcError`` becomes ``CallFailed`` with the same status code. Each call has its
CLIENT span (``services.common.rpc_tracing``), the parent of the callee's SERVER span.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace

from cachemesh.v1 import model_pb2, model_pb2_grpc, prefix_cache_pb2_grpc, semantic_cache_pb2_grpc
from cachemesh.v1 import prefix_cache_pb2 as pc
from cachemesh.v1 import semantic_cache_pb2 as sc
from services.common.auth import internal_metadata
from services.common.channels import channel_options
from services.common.errors import MARK_KEY
from services.common.rpc_tracing import ClientSpans, end_call_span, end_cancelled_call_span
from services.common.status import code_of
from services.router.dependencies import CallFailed, Dependencies
from services.router.settings import RouterSettings

T = TypeVar("T")
# a dependency call's method ("Lookup"), its gRPC status name and its duration in seconds
Timer = Callable[[str, str, float], None]


def _untimed(method: str, code: str, seconds: float) -> None:
    """The timer of a router built without metrics."""


@dataclass(frozen=True)
class CallTiming:
    """Times each dependency call (``timer``: the router's metrics) on ``clock``."""

    timer: Timer = _untimed
    clock: Callable[[], float] = time.perf_counter


def _method(descriptor: Any, service: str, name: str) -> str:
    """The full method name gRPC calls it by: ``/package.Service/Method``."""
    return f"/{descriptor.services_by_name[service].full_name}/{name}"


_LOOKUP = _method(sc.DESCRIPTOR, "SemanticCache", "Lookup")
_STORE = _method(sc.DESCRIPTOR, "SemanticCache", "Store")
_RELEASE = _method(sc.DESCRIPTOR, "SemanticCache", "Release")
_RENEW = _method(sc.DESCRIPTOR, "SemanticCache", "Renew")
_PLAN = _method(pc.DESCRIPTOR, "PrefixCache", "Plan")
_COMMIT = _method(pc.DESCRIPTOR, "PrefixCache", "Commit")
_GENERATE = _method(model_pb2.DESCRIPTOR, "Model", "Generate")


REASON_KEY = "cachemesh-reason"  # a model replica's short reason (services.model.servicer)
# a model replica's wait its provider asked for, in whole seconds (services.model.servicer)
RETRY_AFTER_KEY = "retry-after"
# a model replica's mark: its provider retries were spent on the call (services.model.servicer)
RETRIED_KEY = "cachemesh-retried"
# where a model replica's retry-after came from: "provider" or "backoff" (its own, after its
# retries; services.model.servicer). A replica from before it sends none: its retry-after is
# then its provider's, unless it marked the call retried (a backoff or the provider's: read as
# its backoff, so that no message claims the provider asked for it)
RETRY_AFTER_FROM_KEY = "cachemesh-retry-after-from"
_MAX_RETRY_AFTER_S = 366 * 86_400  # a longer one is no figure a caller can wait for


def failed(exc: grpc.aio.AioRpcError) -> CallFailed:
    trailers = _trailing(exc)
    retried = any(key == RETRIED_KEY and value == "1" for key, value in trailers)
    source = next((value for key, value in trailers if key == RETRY_AFTER_FROM_KEY), None)
    return CallFailed(
        code_of(exc.code()),
        exc.details() or exc.code().name,
        _reason(exc),
        retry_after_s=_retry_after(exc),
        retried=retried,
        backoff_wait=source == "backoff" or (source is None and retried),
        mark=next((v for k, v in trailers if k == MARK_KEY and isinstance(v, str)), ""),
    )


def _trailing(exc: grpc.aio.AioRpcError) -> tuple[tuple[str, str | bytes], ...]:
    return tuple(exc.trailing_metadata() or ())


def _reason(exc: grpc.aio.AioRpcError) -> str:
    for key, value in exc.trailing_metadata() or ():
        if key == REASON_KEY and isinstance(value, str):
            return value
    return ""


def _retry_after(exc: grpc.aio.AioRpcError) -> int | None:
    """The callee's ``retry-after`` trailer: whole seconds, else None (none, or not a figure)."""
    for key, value in exc.trailing_metadata() or ():
        if key == RETRY_AFTER_KEY and isinstance(value, str):
            if value.isascii() and value.isdigit() and 0 < int(value) <= _MAX_RETRY_AFTER_S:
                return int(value)
            return None
    return None


# a model replica's refusal of the request's own fault (``calls.CLIENT_FAULTS``): its details
# are the caller's message, which may quote the provider's, which may quote the prompt
_REQUESTS_FAULTS = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED})


def _described(exc: grpc.aio.AioRpcError) -> str:
    """What a model call's span says of its failure: the replica's details, but for a refusal
    of the request's own fault, whose details are the caller's message (a provider's 400
    quoting the prompt: no span holds a prompt), the replica's short reason (its provider's
    status, error type, code and param: ``services.model.providers.failures.identifiers``), or
    the refusal's code's name when it sent none (an older replica, whose details may quote its
    provider: never them)."""
    if exc.code() in _REQUESTS_FAULTS:
        return _reason(exc) or exc.code().name
    return exc.details() or ""


def _short(method: str) -> str:
    return method.rpartition("/")[2]


async def _unary(
    spans: ClientSpans,
    method: str,
    invoke: Callable[..., Awaitable[T]],
    request: object,
    deadline_s: float,
    timing: CallTiming,
) -> T:
    span, metadata = spans.start(method)
    began = timing.clock()
    code = grpc.StatusCode.CANCELLED
    try:
        reply = await invoke(request, timeout=deadline_s, metadata=metadata)
        code = grpc.StatusCode.OK
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        end_call_span(span, code, exc.details() or "")
        raise failed(exc) from exc
    except asyncio.CancelledError:  # the router's caller left: the router gave the call up
        end_cancelled_call_span(span)
        raise
    except BaseException as exc:  # not the callee's answer: the router's own failure
        code = grpc.StatusCode.UNKNOWN
        end_call_span(span, code, type(exc).__name__)
        raise
    finally:
        timing.timer(_short(method), code.name, timing.clock() - began)
    end_call_span(span, grpc.StatusCode.OK)
    return reply


@dataclass
class GrpcSemantic:
    stub: semantic_cache_pb2_grpc.SemanticCacheAsyncStub
    spans: ClientSpans
    timing: CallTiming = field(default_factory=CallTiming)

    async def lookup(self, request: sc.LookupRequest, deadline_s: float) -> sc.LookupResponse:
        return await _unary(self.spans, _LOOKUP, self.stub.Lookup, request, deadline_s, self.timing)

    async def store(self, request: sc.StoreRequest, deadline_s: float) -> sc.StoreResponse:
        return await _unary(self.spans, _STORE, self.stub.Store, request, deadline_s, self.timing)

    async def release(self, request: sc.ReleaseRequest, deadline_s: float) -> sc.ReleaseResponse:
        return await _unary(
            self.spans, _RELEASE, self.stub.Release, request, deadline_s, self.timing
        )

    async def renew(self, request: sc.RenewRequest, deadline_s: float) -> sc.RenewResponse:
        return await _unary(self.spans, _RENEW, self.stub.Renew, request, deadline_s, self.timing)


@dataclass
class GrpcPrefix:
    stub: prefix_cache_pb2_grpc.PrefixCacheAsyncStub
    spans: ClientSpans
    timing: CallTiming = field(default_factory=CallTiming)

    async def plan(self, request: pc.PlanRequest, deadline_s: float) -> pc.PlanResponse:
        return await _unary(self.spans, _PLAN, self.stub.Plan, request, deadline_s, self.timing)

    async def commit(self, request: pc.CommitRequest, deadline_s: float) -> pc.CommitResponse:
        return await _unary(self.spans, _COMMIT, self.stub.Commit, request, deadline_s, self.timing)


@dataclass
class GrpcHealth:
    """A dependency's grpc.health.v1 status for one of its services: asked with no span and no
    credential (health checks are open), so asking it adds nothing to a trace."""

    stub: Any  # a health_pb2_grpc.HealthStub: grpc_health ships no stub types
    service: str  # its full proto name, e.g. "cachemesh.v1.PrefixCache"

    async def serving(self, deadline_s: float) -> bool:
        """True if it says SERVING within ``deadline_s``, or has no health to say
        (UNIMPLEMENTED, NOT_FOUND: what waits on this answer is never held back by a peer
        without it); False for any other answer, or none."""
        request = health_pb2.HealthCheckRequest(service=self.service)
        try:
            reply: health_pb2.HealthCheckResponse = await self.stub.Check(
                request, timeout=deadline_s
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.NOT_FOUND)
        return reply.status == health_pb2.HealthCheckResponse.SERVING


class GrpcModelStream:
    """A Generate call and its span, which ends with the stream (its end, failure or cancel);
    its duration, from the call to the stream's end, is timed as ``Generate``."""

    def __init__(
        self,
        call: grpc.aio.UnaryStreamCall[model_pb2.GenerateRequest, model_pb2.GenerateChunk],
        span: trace.Span,
        timing: CallTiming = CallTiming(),
    ) -> None:
        self._call = call
        self._span: trace.Span | None = span
        self._timing = timing
        self._began = timing.clock()

    async def read(self) -> model_pb2.GenerateChunk | None:
        try:
            chunk = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            self._end(exc.code(), _described(exc))
            raise failed(exc) from exc
        if chunk is grpc.aio.EOF:
            self._end(grpc.StatusCode.OK)
            return None
        assert isinstance(chunk, model_pb2.GenerateChunk)
        return chunk

    def cancel(self) -> None:
        """The router gives the stream up (its caller left, or it wants no more of it): no
        failure of the replica's."""
        self._call.cancel()
        self._end(grpc.StatusCode.CANCELLED, own=True)

    def _end(self, code: grpc.StatusCode, details: str = "", own: bool = False) -> None:
        """``own``: the router cancelled the call itself."""
        if self._span is not None:
            if own:
                end_cancelled_call_span(self._span)
            else:
                end_call_span(self._span, code, details)
            self._span = None
            self._timing.timer("Generate", code.name, self._timing.clock() - self._began)


@dataclass
class GrpcModels:
    stubs: dict[str, model_pb2_grpc.ModelAsyncStub]  # replica address -> stub
    spans: ClientSpans
    timing: CallTiming = field(default_factory=CallTiming)

    def generate(
        self, replica: str, request: model_pb2.GenerateRequest, deadline_s: float
    ) -> GrpcModelStream:
        span, metadata = self.spans.start(_GENERATE)
        call = self.stubs[replica].Generate(request, timeout=deadline_s, metadata=metadata)
        return GrpcModelStream(call, span, self.timing)


@dataclass
class Connected:
    dependencies: Dependencies
    channels: list[grpc.aio.Channel]
    # the same channels, for the Admin API's calls (Drop, Stats, policy; Totals)
    semantic: semantic_cache_pb2_grpc.SemanticCacheAsyncStub
    prefix: prefix_cache_pb2_grpc.PrefixCacheAsyncStub
    # prefix-cache's health on the same channel (the billing outbox's replays)
    prefix_health: GrpcHealth

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


def connect(
    settings: RouterSettings, tracer: trace.Tracer, timing: CallTiming = CallTiming()
) -> Connected:
    channels: dict[str, grpc.aio.Channel] = {}

    def channel(address: str) -> grpc.aio.Channel:
        if address not in channels:
            # reconnects within a second of a dependency's return, keepalive notices a dead one;
            # messages up to CACHEMESH_MAX_MESSAGE_BYTES, the services' limit (a fixed 8 MiB
            # refused, in the router, every request over it that ROUTER_MAX_REQUEST_BYTES took)
            channels[address] = grpc.aio.insecure_channel(
                address, options=channel_options(settings.server.send_limit)
            )
        return channels[address]

    spans = ClientSpans(tracer, internal_metadata(settings.internal_token))
    semantic = semantic_cache_pb2_grpc.SemanticCacheStub(channel(settings.semantic_cache_addr))
    prefix = prefix_cache_pb2_grpc.PrefixCacheStub(channel(settings.prefix_cache_addr))
    prefix_health = GrpcHealth(
        health_pb2_grpc.HealthStub(channel(settings.prefix_cache_addr)),
        pc.DESCRIPTOR.services_by_name["PrefixCache"].full_name,
    )
    dependencies = Dependencies(
        semantic=GrpcSemantic(semantic, spans, timing),
        prefix=GrpcPrefix(prefix, spans, timing),
        model=GrpcModels(
            {
                address: model_pb2_grpc.ModelStub(channel(address))
                for addresses in settings.replicas.values()
                for address in addresses
            },
            spans,
            timing,
        ),
        models=dict(settings.replicas),
    )
    return Connected(dependencies, list(channels.values()), semantic, prefix, prefix_health)
