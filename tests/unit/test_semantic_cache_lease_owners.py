"""A lease is ended or renewed only by the request that took it.

A lease's id is unique among the live leases only: once a lease has ended (stored, aged out), a
Lookup of another request may take a new lease under the same id (its caller proposed it: ids
are the caller's). The first request's late calls by that id then acted on the other request's
lease: a renewal (in flight as its Store went) renewed it, a Release by id alone (its router
took the Lookup's reply for lost) or by its request and id ended it, and so did L1's own end of
a leading Lookup whose reply did not reach its caller (``abandon``), by tenant and id. An ended
lease wakes its waiters, and one of them leads a second, paid, model call while the holder's
runs. Each now names its request (``request_id``) and acts only on a lease that request took;
one naming none (a router older than RenewRequest/ReleaseRequest.request_id) acts as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import grpc
import pytest

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import semantic_cache_pb2 as sc
from cachemesh.v1 import semantic_cache_pb2_grpc as sc_grpc
from services.common.clock import ManualClock
from services.common.errors import RequestError
from services.semantic_cache.api import SemanticCacheApi
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.leases import Leases
from services.semantic_cache.query import Query, RecentQueries, query_from_request
from services.semantic_cache.records import InvalidQuery
from services.semantic_cache.servicer import SemanticCacheService
from tests.unit.semantic_cache_support import FakeEmbedder, make_request
from tests.unit.test_semantic_cache_grpc import AUTH, start

X = "a" * 32  # the id both requests' callers propose
ANSWER = sc.CachedAnswer(
    content=[pb.ContentBlock(text="Open Settings.")], stop_reason="end_turn", output_tokens=3
)


def _request(question: str, request_id: str) -> pb.CompleteRequest:
    request = make_request(question)
    request.request_id = request_id
    return request


FIRST = _request("How do I reset my password?", "r1")
SECOND = _request("What is the capital of France?", "r2")


def _rig() -> tuple[SemanticCacheApi, SemanticCache, ManualClock]:
    clock = ManualClock()
    cache = SemanticCache(FakeEmbedder(), clock, threshold=0.8, leases=Leases(clock, 30.0))
    return SemanticCacheApi(cache, lease_wait_s=0.0), cache, clock


def _held(cache: SemanticCache, request: pb.CompleteRequest) -> bool:
    return cache.lease_pending(query_from_request("a", request))


def _lookup(request: pb.CompleteRequest, lease_id: str = X) -> sc.LookupRequest:
    return sc.LookupRequest(tenant="a", request=request, lease_id=lease_id)


async def _second_took_the_first_ones_id(api: SemanticCacheApi) -> None:
    """r1 leads under X and stores (its lease ends); r2's Lookup then leads under X too."""
    led = await api.lookup(_lookup(FIRST), 5.0)
    assert led.leader and led.lease_id == X
    store = sc.StoreRequest(tenant="a", request=FIRST, answer=ANSWER, lease_id=X)
    assert (await api.store(store)).stored
    later = await api.lookup(_lookup(SECOND), 5.0)
    assert later.leader and later.lease_id == X  # no live lease had it: given


def test_the_leases_renew_and_end_only_for_the_request_that_took_them() -> None:
    clock = ManualClock()
    leases = Leases(clock, 30.0)
    first, second = ("a", "s", "reset my password"), ("a", "s", "capital of france")
    assert leases.take(first, "r1", X) == X
    assert leases.end(first, X, "r1")
    assert leases.take(second, "r2", X) == X  # the id is free again
    assert not leases.renew("a", X, "r1"), "r1's late renewal renewed r2's lease"
    assert not leases.end_id("a", X, owner="r1"), "r1's late Release ended r2's lease"
    assert not leases.end(second, X, "r1")
    assert leases.renew("a", X, "r2")
    assert leases.renew("a", X)  # naming no request (an older router): as before
    assert leases.end_id("a", X, owner="r2") and not len(leases)


async def test_a_late_renewal_renews_no_lease_another_request_took_under_its_id() -> None:
    api, cache, clock = _rig()
    await _second_took_the_first_ones_id(api)
    late = await api.renew(sc.RenewRequest(tenant="a", lease_id=X, request_id="r1"))
    assert not late.renewed, "r1's late renewal renewed r2's lease"
    clock.advance(s=30.0)  # r2's age limit, from its take: not held on by r1's renewal
    assert not _held(cache, SECOND)
    # r2's own renewal, and one naming no request (an older router), still renew
    again = await api.lookup(_lookup(SECOND), 5.0)
    assert again.leader and again.lease_id == X
    own = await api.renew(sc.RenewRequest(tenant="a", lease_id=X, request_id="r2"))
    assert own.renewed and own.lease_s == 30.0
    assert (await api.renew(sc.RenewRequest(tenant="a", lease_id=X))).renewed


async def test_a_late_release_by_id_ends_no_lease_another_request_took_under_it() -> None:
    """r1's router took its Lookup's reply for lost and releases by the id alone; the Release
    arrives once r2's Lookup (over: the id not contested) has taken a lease under it."""
    api, cache, _ = _rig()
    await _second_took_the_first_ones_id(api)
    late = await api.release(sc.ReleaseRequest(tenant="a", lease_id=X, request_id="r1"))
    assert not late.released, "r1's late Release ended r2's lease"
    assert _held(cache, SECOND)
    assert (await api.release(sc.ReleaseRequest(tenant="a", lease_id=X, request_id="r2"))).released
    assert not _held(cache, SECOND)


async def test_a_release_by_id_naming_no_request_ends_as_before() -> None:
    """A router older than ReleaseRequest.request_id: by tenant and id alone."""
    api, cache, _ = _rig()
    await _second_took_the_first_ones_id(api)
    assert (await api.release(sc.ReleaseRequest(tenant="a", lease_id=X))).released
    assert not _held(cache, SECOND)


async def test_the_holders_own_release_by_a_contested_id_ends_its_lease() -> None:
    """A Lookup of another request proposed the holder's id (given one of L1's): its Release
    by that id ends nothing, and, named by its request_id, the holder's own now ends it (by id
    alone it was not told apart: the lease waited for its age limit)."""
    api, cache, _ = _rig()
    led = await api.lookup(_lookup(FIRST), 5.0)
    other = await api.lookup(_lookup(SECOND), 5.0)
    assert led.lease_id == X and other.leader and other.lease_id != X
    theirs = sc.ReleaseRequest(tenant="a", lease_id=X, request_id="r2")
    assert not (await api.release(theirs)).released
    assert not (await api.release(sc.ReleaseRequest(tenant="a", lease_id=X))).released
    assert _held(cache, FIRST)
    mine = sc.ReleaseRequest(tenant="a", lease_id=X, request_id="r1")
    assert (await api.release(mine)).released
    assert not _held(cache, FIRST)


async def test_a_late_release_by_request_and_id_ends_no_lease_taken_since_under_the_id() -> None:
    """The same question: r1's lease aged out, r2 (identical) leads under the same id, and
    r1's Release by its request and id arrives late."""
    api, cache, clock = _rig()
    same = _request("How do I reset my password?", "r2")
    assert (await api.lookup(_lookup(FIRST), 5.0)).leader
    clock.advance(s=31.0)
    later = await api.lookup(_lookup(same), 5.0)
    assert later.leader and later.lease_id == X
    late = sc.ReleaseRequest(tenant="a", request=FIRST, lease_id=X)
    assert not (await api.release(late)).released, "r1's late Release ended r2's lease"
    assert _held(cache, same)
    mine = sc.ReleaseRequest(tenant="a", request=same, lease_id=X)
    assert (await api.release(mine)).released


async def test_an_abandoned_lookup_ends_no_lease_taken_under_its_id_meanwhile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """r1's Lookup leads under X, then waits for its reply's embedding (held here) past its
    lease's age limit; r2's Lookup takes a lease under X meanwhile; r1's Lookup is cancelled
    (its deadline passed): L1 ended the lease by tenant and id, r2's."""
    api, cache, clock = _rig()
    embedding = asyncio.Event()

    async def held(self: SemanticCacheApi, *_: object) -> None:
        embedding.set()
        await asyncio.Event().wait()  # until cancelled

    monkeypatch.setattr(SemanticCacheApi, "_embedding_into", held)
    first = sc.LookupRequest(tenant="a", request=FIRST, lease_id=X, want_embedding=True)
    looking = asyncio.ensure_future(api.lookup(first, 5.0))
    await asyncio.wait_for(embedding.wait(), 5.0)  # only against a hang
    assert _held(cache, FIRST)
    clock.advance(s=31.0)  # r1's lease past its age limit: r2's take ends it
    later = await api.lookup(_lookup(SECOND), 5.0)
    assert later.leader and later.lease_id == X
    looking.cancel()
    with pytest.raises(asyncio.CancelledError):
        await looking
    assert _held(cache, SECOND), "r1's abandoned Lookup ended r2's lease"


async def _late_call_fails_at_its_query(
    monkeypatch: pytest.MonkeyPatch, how: str, call: Coroutine[Any, Any, object]
) -> None:
    """Runs ``call`` with its query's derivation failing (``how``): ``cancelled`` there (a
    large request's, its router's deadline passed) or ``refused`` (InvalidQuery)."""
    started = asyncio.Event()

    async def failing(*_: object, **__: object) -> Query:
        started.set()
        if how == "refused":
            raise InvalidQuery("request.messages", "no question in the request")
        await asyncio.Event().wait()  # never: the call is cancelled first
        raise AssertionError("not reached")

    monkeypatch.setattr(RecentQueries, "derived", failing)
    task = asyncio.ensure_future(call)
    await asyncio.wait_for(started.wait(), 5.0)  # only against a hang
    if how == "cancelled":
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    else:
        with pytest.raises(RequestError):
            await task


@pytest.mark.parametrize("how", ["cancelled", "refused"])
@pytest.mark.parametrize("call", ["Store", "Release"])
async def test_a_late_call_whose_query_fails_ends_no_lease_another_request_took_under_its_id(
    monkeypatch: pytest.MonkeyPatch, call: str, how: str
) -> None:
    """r1 stored under X, r2 leads under X; r1's late Store or Release by its request and X
    (sent again, or in flight as its Store went) fails while its query is derived: L1 ends the
    lease it names by its id (no query to key it by), and only if r1 took it. By the id alone,
    it ended r2's lease (its waiters would lead calls of their own while r2's runs)."""
    api, cache, _ = _rig()
    await _second_took_the_first_ones_id(api)
    late: Coroutine[Any, Any, object]
    if call == "Store":
        late = api.store(sc.StoreRequest(tenant="a", request=FIRST, answer=ANSWER, lease_id=X))
    else:
        late = api.release(sc.ReleaseRequest(tenant="a", request=FIRST, lease_id=X))
    await _late_call_fails_at_its_query(monkeypatch, how, late)
    assert _held(cache, SECOND), f"r1's late {call} ended r2's lease"
    # r2's own, failing the same way, still ends it (its router renews it no more)
    mine = api.store(sc.StoreRequest(tenant="a", request=SECOND, answer=ANSWER, lease_id=X))
    await _late_call_fails_at_its_query(monkeypatch, how, mine)
    assert not _held(cache, SECOND), "r2's own failed Store left its lease held"


async def test_through_the_servicer_late_renewals_and_releases_spare_the_later_lease() -> None:
    clock = ManualClock()
    cache = SemanticCache(FakeEmbedder(), clock, threshold=0.8, leases=Leases(clock, 30.0))
    server, port = await start(SemanticCacheService(SemanticCacheApi(cache)))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = sc_grpc.SemanticCacheStub(channel)
            led = await stub.Lookup(_lookup(FIRST), metadata=AUTH)
            assert led.leader and led.lease_id == X
            store = sc.StoreRequest(tenant="a", request=FIRST, answer=ANSWER, lease_id=X)
            assert (await stub.Store(store, metadata=AUTH)).stored
            later = await stub.Lookup(_lookup(SECOND), metadata=AUTH)
            assert later.leader and later.lease_id == X
            renew = sc.RenewRequest(tenant="a", lease_id=X, request_id="r1")
            assert not (await stub.Renew(renew, metadata=AUTH)).renewed
            release = sc.ReleaseRequest(tenant="a", lease_id=X, request_id="r1")
            assert not (await stub.Release(release, metadata=AUTH)).released
            assert _held(cache, SECOND)
            renew.request_id = release.request_id = "r2"
            assert (await stub.Renew(renew, metadata=AUTH)).renewed
            assert (await stub.Release(release, metadata=AUTH)).released
            assert not _held(cache, SECOND)
    finally:
        await server.stop(None)
