"""A leading Lookup whose reply was sent in time but reached the router after its deadline:
the router never learned the lease_id, so it could neither renew nor release the lease, and
identical requests waited on it up to its age limit (SEMANTIC_CACHE_LEASE_S, 30 s).

The router's real calls (``Calls`` over ``GrpcSemantic``) to a real L1 servicer on loopback,
through a TCP proxy that holds L1's replies once the Lookup has replied (the network's delay):
L1 sent the reply with time to spare (so it does not end the lease itself), and the router
sees DEADLINE_EXCEEDED. The leases age on an injected clock that never moves: nothing is timed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from opentelemetry import trace

from cachemesh.v1 import semantic_cache_pb2 as sc
from cachemesh.v1 import semantic_cache_pb2_grpc as sc_grpc
from services.common.auth import InternalAuthInterceptor, internal_metadata
from services.common.clock import ManualClock
from services.common.rpc_tracing import ClientSpans
from services.router.calls import Calls
from services.router.dependencies import Dependencies
from services.router.grpc_adapters import GrpcSemantic
from services.semantic_cache.api import SemanticCacheApi
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.leases import Leases
from services.semantic_cache.query import query_from_request
from services.semantic_cache.servicer import SemanticCacheService
from tests.unit.semantic_cache_support import FakeEmbedder, make_request
from tests.unit.test_router_pipeline import REPLICAS, FakeModels, FakePrefix, _settings

TOKEN = "t" * 32  # the router's settings (``_settings``) carry this internal token
Context = grpc.aio.ServicerContext[Any, Any]
Wired = tuple[SemanticCache, "Observed", Calls, "sc_grpc.SemanticCacheAsyncStub"]


class HoldingProxy:
    """Forwards TCP both ways; while ``holding``, what the server sends is kept back (the
    reply is on its way), and ``let_go`` sends it on in order."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream_port = upstream_port
        self.holding = False
        self._held: list[tuple[asyncio.StreamWriter, bytes]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._connected, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def let_go(self) -> None:
        self.holding = False
        for writer, data in self._held:
            writer.write(data)
        self._held.clear()

    async def close(self) -> None:
        self._server.close()
        for writer in self._writers:
            writer.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._upstream_port)
        self._writers += [writer, up_writer]
        for pump in (self._pump(reader, up_writer, False), self._pump(up_reader, writer, True)):
            task = asyncio.ensure_future(pump)
            self._tasks.add(task)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, down: bool
    ) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if down and self.holding:
                    self._held.append((writer, data))
                    continue
                writer.write(data)
                await writer.drain()


class Observed(SemanticCacheService):
    """The servicer; a leading Lookup's reply is held by the proxy, and each Release is told."""

    def __init__(self, api: SemanticCacheApi, proxy: HoldingProxy) -> None:
        super().__init__(api)
        self.proxy = proxy
        self.released = asyncio.Event()
        self.releases: list[tuple[sc.ReleaseRequest, bool]] = []  # each, and its reply

    async def Lookup(self, request: sc.LookupRequest, context: Context) -> sc.LookupResponse:
        reply = await super().Lookup(request, context)
        if reply.leader:
            self.proxy.holding = True  # sent with time to spare; it arrives late
        return reply

    async def Release(self, request: sc.ReleaseRequest, context: Context) -> sc.ReleaseResponse:
        try:
            reply = await super().Release(request, context)
            self.releases.append((request, reply.released))
            return reply
        finally:
            self.released.set()


@pytest.fixture
async def wired() -> AsyncIterator[Wired]:
    """L1 (its leases on a clock that never moves), the proxy in front of it, the router's
    calls through the proxy, and a stub straight to L1."""
    clock = ManualClock()
    cache = SemanticCache(FakeEmbedder(), clock, threshold=0.8, leases=Leases(clock, 30.0))
    server = grpc.aio.server(interceptors=[InternalAuthInterceptor(TOKEN)])
    port = server.add_insecure_port("127.0.0.1:0")
    proxy = HoldingProxy(port)
    service = Observed(SemanticCacheApi(cache, lease_wait_s=30.0), proxy)
    sc_grpc.add_SemanticCacheServicer_to_server(service, server)
    await server.start()
    proxied = grpc.aio.insecure_channel(f"127.0.0.1:{await proxy.start()}")
    direct = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    spans = ClientSpans(trace.NoOpTracer(), internal_metadata(TOKEN))
    semantic = GrpcSemantic(sc_grpc.SemanticCacheStub(proxied), spans)
    calls = Calls(Dependencies(semantic, FakePrefix(), FakeModels(), REPLICAS), _settings())
    try:
        yield cache, service, calls, sc_grpc.SemanticCacheStub(direct)
    finally:
        proxy.let_go()
        await proxied.close()
        await direct.close()
        await proxy.close()
        await server.stop(None)


async def test_a_leading_lookup_whose_reply_arrives_late_is_released_by_the_router(
    wired: Wired,
) -> None:
    cache, service, calls, l1 = wired
    request = make_request("Reset my password")
    request.request_id = "r1"
    twin = query_from_request("a", request)
    # the Lookup's deadline: half of the 1 s the request has left
    looked_up = await calls.lookup("a", request, deadline=time.monotonic() + 1.0)
    assert looked_up is None  # DEADLINE_EXCEEDED: degraded, the model is called
    assert cache.lease_pending(twin)  # L1 replied in time: it holds the lease for the router
    service.proxy.let_go()
    # the router's Release, in the background (before: none came, the lease held for 30 s)
    await asyncio.wait_for(service.released.wait(), 5.0)
    assert not cache.lease_pending(twin)
    again = sc.LookupRequest(tenant="a", request=make_request("Reset my password"))
    assert (await l1.Lookup(again, metadata=internal_metadata(TOKEN), timeout=5.0)).leader


async def test_a_lost_lookups_release_names_the_lease_alone_not_the_request(
    wired: Wired,
) -> None:
    """A Lookup fails DEADLINE_EXCEEDED or UNAVAILABLE most when L1 is overloaded: the Release
    that follows names the lease by its tenant and lease_id (as Renew does), not the request,
    which may be megabytes (here a 256 KB system prompt). Before, it carried the whole request
    again: as many bytes once more, sent to (and parsed by) an L1 already failing."""
    cache, service, calls, _ = wired
    request = make_request("Reset my password", system="You are a support bot. " * 12_000)
    request.request_id = "r1"
    twin = query_from_request("a", request)
    looked_up = await calls.lookup("a", request, deadline=time.monotonic() + 1.0)
    assert looked_up is None and cache.lease_pending(twin)  # the reply is on its way
    service.proxy.let_go()
    await asyncio.wait_for(service.released.wait(), 5.0)  # a safety net only
    [(release, released)] = service.releases
    assert released and not cache.lease_pending(twin)
    assert release.tenant == "a" and release.lease_id
    assert not release.HasField("request") and release.ByteSize() < 100
