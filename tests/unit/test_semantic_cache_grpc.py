"""The gRPC servicer on a loopback port, behind the internal-credential interceptor."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import grpc
import pytest

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import semantic_cache_pb2 as sc
from cachemesh.v1 import semantic_cache_pb2_grpc as sc_grpc
from services.common.auth import InternalAuthInterceptor, internal_metadata
from services.common.clock import ManualClock
from services.common.env import ConfigError
from services.semantic_cache import api as api_module
from services.semantic_cache import cache as cache_module
from services.semantic_cache.api import SemanticCacheApi
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.leases import Leases, wait
from services.semantic_cache.query import query_from_request
from services.semantic_cache.servicer import SemanticCacheService
from tests.unit.semantic_cache_support import FakeEmbedder, make_request

TOKEN = "test-internal-token-0123456789"
AUTH = internal_metadata(TOKEN)
ANSWER = sc.CachedAnswer(
    content=[pb.ContentBlock(text="Open Settings, then Security.")],
    model="sim-small",
    tier="small",
    stop_reason="end_turn",
    output_tokens=12,
)


def leased_cache() -> SemanticCache:
    """A cache with single-flight leases (30 s) on a clock that never moves by itself."""
    clock = ManualClock()
    return SemanticCache(FakeEmbedder(), clock, threshold=0.8, leases=Leases(clock, 30.0))


async def start(service: SemanticCacheService) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(interceptors=[InternalAuthInterceptor(TOKEN)])
    sc_grpc.add_SemanticCacheServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


@pytest.fixture
async def stub() -> AsyncIterator[sc_grpc.SemanticCacheAsyncStub]:
    cache = SemanticCache(FakeEmbedder(), ManualClock(), threshold=0.8)
    server, port = await start(SemanticCacheService(SemanticCacheApi(cache)))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield sc_grpc.SemanticCacheStub(channel)
    await server.stop(None)


async def test_a_call_without_the_credential_is_unauthenticated(
    stub: sc_grpc.SemanticCacheAsyncStub,
) -> None:
    lookup = stub.Lookup(sc.LookupRequest(tenant="a", request=make_request()))
    assert "credential" in await expect(grpc.StatusCode.UNAUTHENTICATED, lookup)


async def expect(code: grpc.StatusCode, call: Awaitable[object]) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code
    return caught.value.details() or ""


@pytest.mark.parametrize("tenant", ["\u202eevil", "a\x00b", "t" * 100_000])
async def test_stats_refuses_a_bad_tenant_name_and_does_not_echo_it(
    stub: sc_grpc.SemanticCacheAsyncStub, tenant: str
) -> None:
    """Stats answered OK with a row named by whatever it was sent (100 kB, a NUL, a
    right-to-left override): it refuses the name as every other call does."""
    stats = stub.Stats(sc.L1StatsRequest(tenant=tenant), metadata=AUTH)
    details = await expect(grpc.StatusCode.INVALID_ARGUMENT, stats)
    assert details.startswith("tenant must be 1 to 64"), details
    assert len(details) < 300 and "\x00" not in details and "\u202e" not in details


async def test_an_empty_tenant_is_invalid(stub: sc_grpc.SemanticCacheAsyncStub) -> None:
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    lookup = stub.Lookup(sc.LookupRequest(request=make_request()), metadata=AUTH)
    assert "tenant" in await expect(invalid, lookup)
    store = stub.Store(sc.StoreRequest(request=make_request(), answer=ANSWER), metadata=AUTH)
    assert "tenant" in await expect(invalid, store)
    assert "tenant" in await expect(invalid, stub.Drop(sc.DropRequest(), metadata=AUTH))


async def test_a_bad_threshold_names_the_field(stub: sc_grpc.SemanticCacheAsyncStub) -> None:
    request = sc.LookupRequest(tenant="a", request=make_request(threshold=2.0))
    lookup = stub.Lookup(request, metadata=AUTH)
    assert "cache.threshold" in await expect(grpc.StatusCode.INVALID_ARGUMENT, lookup)


async def test_store_then_lookup_hits_and_drop_clears(
    stub: sc_grpc.SemanticCacheAsyncStub,
) -> None:
    store = sc.StoreRequest(tenant="a", request=make_request("Reset my password"), answer=ANSWER)
    stored = await stub.Store(store, metadata=AUTH)
    assert stored.stored and len(stored.entry_id) == 32
    lookup = sc.LookupRequest(tenant="a", request=make_request("reset  my password"))
    found = await stub.Lookup(lookup, metadata=AUTH)
    assert found.hit and found.match.exact and found.match.similarity == 1.0
    assert found.match.entry_id == stored.entry_id and found.best_similarity == 1.0
    assert found.answer == ANSWER
    other = await stub.Lookup(sc.LookupRequest(tenant="b", request=lookup.request), metadata=AUTH)
    assert not other.hit
    dropped = await stub.Drop(sc.DropRequest(tenant="a"), metadata=AUTH)
    assert dropped.dropped == 1
    assert not (await stub.Lookup(lookup, metadata=AUTH)).hit


async def test_uncacheable_answers_report_why(stub: sc_grpc.SemanticCacheAsyncStub) -> None:
    tool = sc.CachedAnswer(
        content=[pb.ContentBlock(tool_use=pb.ToolUse(id="t1", name="search"))],
        stop_reason="end_turn",
    )
    result = await stub.Store(
        sc.StoreRequest(tenant="a", request=make_request(), answer=tool), metadata=AUTH
    )
    assert not result.stored and "tool call" in result.skip_reason
    prefill = make_request()
    prefill.messages.append(pb.Message(role=pb.ROLE_ASSISTANT, content=[pb.ContentBlock(text="")]))
    skipped = await stub.Lookup(sc.LookupRequest(tenant="a", request=prefill), metadata=AUTH)
    assert not skipped.hit and skipped.skip_reason


async def test_an_empty_answer_is_not_stored(stub: sc_grpc.SemanticCacheAsyncStub) -> None:
    """An end_turn answer with no text (no block, or blank ones) and no tool call would be
    served to the question and its paraphrases for the whole TTL."""
    blank = [pb.ContentBlock(text=""), pb.ContentBlock(text=" \n\t ")]
    for content in ([], blank):
        empty = sc.CachedAnswer(content=content, stop_reason="end_turn", output_tokens=0)
        request = make_request("How do I reset my password?")
        result = await stub.Store(
            sc.StoreRequest(tenant="a", request=request, answer=empty), metadata=AUTH
        )
        assert not result.stored and "empty answer" in result.skip_reason
        for text in ("How do I reset my password?", "How can I reset my password?"):
            lookup = sc.LookupRequest(tenant="a", request=make_request(text))
            assert not (await stub.Lookup(lookup, metadata=AUTH)).hit
    text_too = sc.CachedAnswer(content=[*blank, *ANSWER.content], stop_reason="end_turn")
    kept = sc.StoreRequest(tenant="a", request=make_request("Reset it"), answer=text_too)
    assert (await stub.Store(kept, metadata=AUTH)).stored


async def test_before_the_model_is_loaded_calls_are_unavailable() -> None:
    server, port = await start(SemanticCacheService())
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = sc_grpc.SemanticCacheStub(channel)
            drop = stub.Drop(sc.DropRequest(tenant="a"), metadata=AUTH)
            assert "loading" in await expect(grpc.StatusCode.UNAVAILABLE, drop)
    finally:
        await server.stop(None)


async def test_drop_by_entry_removes_only_that_entry_of_that_tenant(
    stub: sc_grpc.SemanticCacheAsyncStub,
) -> None:
    requests = [make_request("Reset my password"), make_request("Cancel my plan")]
    ids = [
        (
            await stub.Store(sc.StoreRequest(tenant="a", request=r, answer=ANSWER), metadata=AUTH)
        ).entry_id
        for r in requests
    ]
    theirs = sc.DropRequest(tenant="b", entry_id=ids[0])
    assert (await stub.Drop(theirs, metadata=AUTH)).dropped == 0
    mine = sc.DropRequest(tenant="a", entry_id=ids[0], namespace="ignored")
    assert (await stub.Drop(mine, metadata=AUTH)).dropped == 1
    first, second = [
        await stub.Lookup(sc.LookupRequest(tenant="a", request=r), metadata=AUTH) for r in requests
    ]
    assert not first.hit and second.hit and second.match.entry_id == ids[1]


async def test_a_lookup_waits_on_an_identical_miss_within_its_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the short Lookup's reply has a second, not the 0.1 s kept in service: its 0.3 s deadline
    # with 0.1 s to reply was missed by a process paused 0.12 s (1 of 15 runs so paused)
    monkeypatch.setattr(api_module, "REPLY_MARGIN_S", 1.0)
    cache = leased_cache()
    server, port = await start(SemanticCacheService(SemanticCacheApi(cache, lease_wait_s=30.0)))
    lookup = sc.LookupRequest(tenant="a", request=make_request("Reset my password"))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = sc_grpc.SemanticCacheStub(channel)
        leader = await stub.Lookup(lookup, metadata=AUTH)
        assert leader.leader and not leader.hit
        short = await stub.Lookup(lookup, metadata=AUTH, timeout=1.5)  # waits <= 0.5 s
        assert not short.hit and not short.leader
        assert short.pending  # the leader's call is still on: worth looking up again
        assert not leader.pending
        waiter = stub.Lookup(lookup, metadata=AUTH, timeout=20.0)
        # the waiter must be waiting on the lease when the Store arrives (a Lookup arriving
        # after the Store waits for the Store instead, and is served without the lease)
        await asyncio.sleep(0.5)
        store = sc.StoreRequest(tenant="a", request=lookup.request, answer=ANSWER)
        stored = await stub.Store(store, metadata=AUTH)
        shared = await waiter
        assert shared.hit and shared.match.entry_id == stored.entry_id
        assert shared.waited and not shared.pending
        other = sc.LookupRequest(tenant="a", request=make_request("Another question"))
        assert not (await stub.Lookup(other, metadata=AUTH)).pending  # it leads, none pends
    await server.stop(None)


async def test_once_the_drain_has_begun_writes_are_unavailable_and_reads_served() -> None:
    draining = asyncio.Event()
    cache = SemanticCache(FakeEmbedder(), ManualClock(), threshold=0.8)
    server, port = await start(SemanticCacheService(SemanticCacheApi(cache, draining=draining)))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = sc_grpc.SemanticCacheStub(channel)
        store = sc.StoreRequest(
            tenant="a", request=make_request("Reset my password"), answer=ANSWER
        )
        assert (await stub.Store(store, metadata=AUTH)).stored
        draining.set()
        refused = stub.Store(store, metadata=AUTH)
        assert "draining" in await expect(grpc.StatusCode.UNAVAILABLE, refused)
        drop = stub.Drop(sc.DropRequest(tenant="a"), metadata=AUTH)
        assert "draining" in await expect(grpc.StatusCode.UNAVAILABLE, drop)
        lookup = sc.LookupRequest(tenant="a", request=store.request)
        assert (await stub.Lookup(lookup, metadata=AUTH)).hit
    await server.stop(None)


async def test_release_ends_a_leaders_lease_and_wakes_its_waiters() -> None:
    cache = leased_cache()
    server, port = await start(SemanticCacheService(SemanticCacheApi(cache, lease_wait_s=30.0)))
    lookup = sc.LookupRequest(tenant="a", request=make_request("Reset my password"))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = sc_grpc.SemanticCacheStub(channel)
        leader = await stub.Lookup(lookup, metadata=AUTH)
        assert leader.leader and leader.lease_id
        waiter = stub.Lookup(lookup, metadata=AUTH, timeout=20.0)

        def release(tenant: str, lease_id: str) -> sc.ReleaseRequest:
            return sc.ReleaseRequest(tenant=tenant, request=lookup.request, lease_id=lease_id)

        other = release("b", leader.lease_id)
        assert not (await stub.Release(other, metadata=AUTH)).released  # not b's lease
        assert not (await stub.Release(release("a", "stale"), metadata=AUTH)).released
        assert (await stub.Release(release("a", leader.lease_id), metadata=AUTH)).released
        woken = await waiter  # at once, not after 20 s: it leads the next call
        assert woken.leader and not woken.hit and woken.lease_id != leader.lease_id
        # the first leader's late Release again: the lease is the waiter's now, and is kept
        assert not (await stub.Release(release("a", leader.lease_id), metadata=AUTH)).released
        assert (await stub.Release(release("a", woken.lease_id), metadata=AUTH)).released
        bad = stub.Release(sc.ReleaseRequest(request=lookup.request), metadata=AUTH)
        assert "tenant" in await expect(grpc.StatusCode.INVALID_ARGUMENT, bad)
        # by its tenant and lease_id alone (a lost Lookup's lease: the request not sent again)
        taken = await stub.Lookup(lookup, metadata=AUTH)
        assert taken.leader
        by_id = sc.ReleaseRequest(tenant="b", lease_id=taken.lease_id)
        assert not (await stub.Release(by_id, metadata=AUTH)).released  # not b's lease
        by_id.tenant = "a"
        assert (await stub.Release(by_id, metadata=AUTH)).released
        assert not (await stub.Release(by_id, metadata=AUTH)).released  # ended already
        unnamed = stub.Release(sc.ReleaseRequest(tenant="a"), metadata=AUTH)
        assert "lease_id" in await expect(grpc.StatusCode.INVALID_ARGUMENT, unnamed)
    await server.stop(None)


async def test_renew_keeps_a_leaders_lease_past_its_age_limit_and_says_when_it_is_over() -> None:
    clock = ManualClock()
    cache = SemanticCache(FakeEmbedder(), clock, threshold=0.8, leases=Leases(clock, 30.0))
    server, port = await start(SemanticCacheService(SemanticCacheApi(cache, lease_wait_s=30.0)))
    lookup = sc.LookupRequest(tenant="a", request=make_request("Reset my password"))
    twin = query_from_request("a", lookup.request)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = sc_grpc.SemanticCacheStub(channel)
        leader = await stub.Lookup(lookup, metadata=AUTH)
        assert leader.leader and leader.lease_s == 30.0

        def renew(tenant: str, lease_id: str) -> sc.RenewRequest:
            return sc.RenewRequest(tenant=tenant, lease_id=lease_id)  # no request: its id

        clock.advance(s=20)
        assert not (await stub.Renew(renew("b", leader.lease_id), metadata=AUTH)).renewed
        assert not (await stub.Renew(renew("a", "stale"), metadata=AUTH)).renewed
        renewed = await stub.Renew(renew("a", leader.lease_id), metadata=AUTH)
        assert renewed.renewed and renewed.lease_s == 30.0
        clock.advance(s=20)  # 40 s from the take
        assert cache.lease_pending(twin)
        released = sc.ReleaseRequest(tenant="a", request=lookup.request, lease_id=leader.lease_id)
        assert (await stub.Release(released, metadata=AUTH)).released
        over = await stub.Renew(renew("a", leader.lease_id), metadata=AUTH)
        assert not over.renewed and not cache.lease_pending(twin)  # no error: it is over
        bad = stub.Renew(sc.RenewRequest(lease_id=leader.lease_id), metadata=AUTH)
        assert "tenant" in await expect(grpc.StatusCode.INVALID_ARGUMENT, bad)
    await server.stop(None)


async def _leasing(
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[ManualClock, SemanticCache, asyncio.Event, tuple[grpc.aio.Server, int]]:
    """An L1 with 30 s leases on a manual clock, served on loopback; the event is set once a
    Lookup waits on a lease."""
    clock = ManualClock()
    cache = SemanticCache(FakeEmbedder(), clock, threshold=0.8, leases=Leases(clock, 30.0))
    waiting = asyncio.Event()
    lease_wait = wait

    async def noted(event: asyncio.Event, budget_s: float) -> bool:
        waiting.set()  # the waiter is on the lease now
        return await lease_wait(event, budget_s)

    monkeypatch.setattr(cache_module, "wait", noted)
    served = await start(SemanticCacheService(SemanticCacheApi(cache, lease_wait_s=30.0)))
    return clock, cache, waiting, served


@pytest.mark.parametrize("late", ["stores", "stores nothing"])
async def test_a_late_store_of_an_aged_out_lease_leaves_the_next_leaders_lease_alone(
    monkeypatch: pytest.MonkeyPatch, late: str
) -> None:
    """The first leader's lease aged out (its call outlasted it, its renewals lost), a second
    request took the key under a new lease_id and a third waits on it. The first call's Store,
    late, names its own lease: it stores (on the usual rules) but leaves the second's lease
    alone (its waiter, woken by the entry, is served it; with nothing stored it waits on for
    the second call's). Before, it ended whatever lease held the key: (nothing stored) the
    waiter woke and led a third model call; and the second leader's renewals found its lease
    gone."""
    clock, cache, waiting, (server, port) = await _leasing(monkeypatch)

    def lookup(request_id: str) -> sc.LookupRequest:
        request = make_request("Reset my password")
        request.request_id = request_id
        return sc.LookupRequest(tenant="a", request=request)

    twin = query_from_request("a", lookup("twin").request)
    truncated = sc.CachedAnswer(content=ANSWER.content, stop_reason="max_tokens")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = sc_grpc.SemanticCacheStub(channel)
            first = await stub.Lookup(lookup("r1"), metadata=AUTH)
            assert first.leader
            clock.advance(s=30)  # its lease's age limit: it was not renewed in time
            second = await stub.Lookup(lookup("r2"), metadata=AUTH)
            assert second.leader and second.lease_id != first.lease_id
            waiter = asyncio.ensure_future(stub.Lookup(lookup("r3"), metadata=AUTH, timeout=20))
            await asyncio.wait_for(waiting.wait(), 10)  # a safety net only
            late_store = sc.StoreRequest(
                tenant="a",
                request=lookup("r1").request,
                answer=ANSWER if late == "stores" else truncated,
                lease_id=first.lease_id,
            )
            stored = await stub.Store(late_store, metadata=AUTH)
            assert stored.stored == (late == "stores")
            if stored.stored:  # the waiter is woken by the entry, and served it
                served = await waiter
                assert served.hit and served.waited and not served.leader
                assert served.match.entry_id == stored.entry_id  # the first call's answer
            assert cache.lease_pending(twin)  # the second call's lease holds on ...
            assert cache.renew("a", second.lease_id)  # ... and its keeper renews it
            own = sc.StoreRequest(
                tenant="a", request=lookup("r2").request, answer=ANSWER, lease_id=second.lease_id
            )
            stored = await stub.Store(own, metadata=AUTH)
            assert stored.stored and not cache.lease_pending(twin)
            served = await waiter
            assert served.hit and served.waited and not served.leader
            if late != "stores":
                assert served.match.entry_id == stored.entry_id  # the second call's answer
    finally:
        await server.stop(None)


async def test_a_lookup_may_name_its_lease_but_a_reused_id_takes_no_other_lease() -> None:
    """The router names the lease a Lookup may take (so it can release it should the reply
    be lost). Leases are per key: a Lookup of another question reusing a live lease's id gets
    an id of L1's instead, and a Release naming the reused id with its own request ends
    nothing of the other key's lease (nor its renewals). A malformed id is refused."""
    cache = leased_cache()
    server, port = await start(SemanticCacheService(SemanticCacheApi(cache, lease_wait_s=30.0)))

    def lookup(text: str, lease_id: str) -> sc.LookupRequest:
        return sc.LookupRequest(tenant="a", request=make_request(text), lease_id=lease_id)

    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = sc_grpc.SemanticCacheStub(channel)
            mine = await stub.Lookup(lookup("Reset my password", "id-1"), metadata=AUTH)
            assert mine.leader and mine.lease_id == "id-1"
            reused = lookup("Cancel my plan", "id-1")
            other = await stub.Lookup(reused, metadata=AUTH)
            assert other.leader and other.lease_id not in ("", "id-1")
            release = sc.ReleaseRequest(tenant="a", request=reused.request, lease_id="id-1")
            assert not (await stub.Release(release, metadata=AUTH)).released
            renew = sc.RenewRequest(tenant="a", lease_id="id-1")
            assert (await stub.Renew(renew, metadata=AUTH)).renewed  # the first key's, still
            assert cache.lease_pending(query_from_request("a", reused.request))
            for bad in ("x" * 65, "id 1", "id/1", "ï"):
                refused = stub.Lookup(lookup("Reset my password", bad), metadata=AUTH)
                details = await expect(grpc.StatusCode.INVALID_ARGUMENT, refused)
                assert "lease_id" in details and "uuid4" in details and bad not in details
    finally:
        await server.stop(None)


async def test_a_store_naming_no_lease_ends_only_its_own_requests_lease(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A request that did not lead (its lease wait ran out, or its Lookup failed: it called
    the model itself) sends its Store naming no lease. It leaves the leader's lease, and its
    waiter, alone; an empty lease_id from the leader itself (a router older than the field)
    still ends its own lease. Before, the empty lease_id ended whatever lease held the key: the
    waiter woke and, nothing stored (a truncated answer), led a second paid model call while
    the leader's still ran, whose renewals then found its lease gone."""
    _, cache, waiting, (server, port) = await _leasing(monkeypatch)

    def request(request_id: str) -> pb.CompleteRequest:
        made = make_request("Reset my password")
        made.request_id = request_id
        return made

    twin = query_from_request("a", request("twin"))
    truncated = sc.CachedAnswer(content=ANSWER.content, stop_reason="max_tokens")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = sc_grpc.SemanticCacheStub(channel)
            leader = await stub.Lookup(
                sc.LookupRequest(tenant="a", request=request("A")), metadata=AUTH
            )
            assert leader.leader
            waiter = asyncio.ensure_future(
                stub.Lookup(
                    sc.LookupRequest(tenant="a", request=request("C")), metadata=AUTH, timeout=20
                )
            )
            await asyncio.wait_for(waiting.wait(), 10)  # a safety net only
            # B called the model itself; its answer hit max_tokens: not stored
            other = sc.StoreRequest(tenant="a", request=request("B"), answer=truncated)
            assert not (await stub.Store(other, metadata=AUTH)).stored
            release = sc.ReleaseRequest(tenant="a", request=request("B"))
            assert not (await stub.Release(release, metadata=AUTH)).released
            assert cache.lease_pending(twin)  # the leader's lease holds on ...
            assert cache.renew("a", leader.lease_id)  # ... and its keeper renews it
            assert not waiter.done()
            # the leader's own Store, from a router that names no lease: ends its lease
            own = sc.StoreRequest(tenant="a", request=request("A"), answer=ANSWER)
            stored = await stub.Store(own, metadata=AUTH)
            assert stored.stored and not cache.lease_pending(twin)
            served = await waiter
            assert served.hit and served.waited and not served.leader
            assert served.match.entry_id == stored.entry_id
    finally:
        await server.stop(None)


@pytest.mark.parametrize("by", ["the late leader", "a request that did not lead"])
async def test_a_store_that_leaves_the_lease_still_wakes_its_waiters_to_look_again(
    monkeypatch: pytest.MonkeyPatch, by: str
) -> None:
    """A Store that stores an entry for a key whose lease it does not end (the late Store of a
    lease that aged out, or a Store of a request that did not lead) wakes that lease's waiters:
    they look again and are served it, while the lease holds on for its leader. A waiter that
    still misses (it accepts only another tier) waits on within its budget, for the leader's
    Store. Before, the waiters slept on to the end of their budget beside a servable entry and
    got a miss (their router then paid a model call of its own)."""
    clock = ManualClock()
    cache = SemanticCache(FakeEmbedder(), clock, threshold=0.8, leases=Leases(clock, 30.0))
    waits = 0
    waiting = asyncio.Event()
    lease_wait = wait

    async def noted(event: asyncio.Event, budget_s: float) -> bool:
        nonlocal waits
        waits += 1
        waiting.set()  # a waiter is on the lease now
        return await lease_wait(event, budget_s)

    monkeypatch.setattr(cache_module, "wait", noted)
    server, port = await start(SemanticCacheService(SemanticCacheApi(cache, lease_wait_s=30.0)))

    def lookup(request_id: str, *tiers: str) -> sc.LookupRequest:
        request = make_request("Reset my password")
        request.request_id = request_id
        return sc.LookupRequest(tenant="a", request=request, accepted_tiers=tiers)

    twin = query_from_request("a", lookup("twin").request)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = sc_grpc.SemanticCacheStub(channel)
            first = await stub.Lookup(lookup("r1"), metadata=AUTH)
            if by == "the late leader":
                clock.advance(s=30)  # its lease's age limit: it was not renewed in time
            leader = first
            if by == "the late leader":
                leader = await stub.Lookup(lookup("r2"), metadata=AUTH)
            assert leader.leader
            # the waiters' deadline: a safety net only (before, they were answered at its end)
            waiter = asyncio.ensure_future(stub.Lookup(lookup("r3"), metadata=AUTH, timeout=5))
            larger = asyncio.ensure_future(
                stub.Lookup(lookup("r4", "large"), metadata=AUTH, timeout=20)
            )
            while waits < 2:
                waiting.clear()
                await asyncio.wait_for(waiting.wait(), 10)
            other = sc.StoreRequest(
                tenant="a",
                request=lookup("r1" if by == "the late leader" else "r0").request,
                answer=ANSWER,  # the small tier's
                lease_id=first.lease_id if by == "the late leader" else "",
            )
            stored = await stub.Store(other, metadata=AUTH)
            assert stored.stored
            served = await waiter
            assert served.hit and served.waited and served.match.entry_id == stored.entry_id
            assert cache.lease_pending(twin) and cache.renew("a", leader.lease_id)
            assert not larger.done()  # a miss for it: it waits on for the leader's answer
            large = sc.CachedAnswer()
            large.CopyFrom(ANSWER)
            large.tier = "large"
            own = sc.StoreRequest(
                tenant="a",
                request=lookup("r2" if by == "the late leader" else "r1").request,
                answer=large,
                lease_id=leader.lease_id,
            )
            stored = await stub.Store(own, metadata=AUTH)
            assert stored.stored and not cache.lease_pending(twin)
            served = await larger
            assert served.hit and served.waited and served.match.entry_id == stored.entry_id
    finally:
        await server.stop(None)


async def test_a_draining_cache_leads_no_call_and_a_refused_store_ends_its_lease() -> None:
    cache = leased_cache()
    draining = asyncio.Event()
    server, port = await start(
        SemanticCacheService(SemanticCacheApi(cache, lease_wait_s=30.0, draining=draining))
    )
    lookup = sc.LookupRequest(tenant="a", request=make_request("Reset my password"))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = sc_grpc.SemanticCacheStub(channel)
        assert (await stub.Lookup(lookup, metadata=AUTH)).leader
        draining.set()
        during = await stub.Lookup(lookup, metadata=AUTH, timeout=20.0)  # no wait
        assert not (during.leader or during.pending or during.hit)
        fresh = sc.LookupRequest(tenant="a", request=make_request("Another question"))
        assert not (await stub.Lookup(fresh, metadata=AUTH)).leader
        store = sc.StoreRequest(tenant="a", request=lookup.request, answer=ANSWER)
        await expect(grpc.StatusCode.UNAVAILABLE, stub.Store(store, metadata=AUTH))
        assert not cache.lease_pending(query_from_request("a", lookup.request))
    await server.stop(None)


@pytest.mark.parametrize("stall", ["awaits", "blocks the loop"])
async def test_a_leading_lookup_whose_reply_misses_its_deadline_leaves_no_lease(
    monkeypatch: pytest.MonkeyPatch, stall: str
) -> None:
    """The Lookup took the lease, then its handler outlasted the caller's deadline (the
    embedding the router wants, on a busy event loop): the router got DEADLINE_EXCEEDED and
    never knew it led, so it neither renews nor releases the lease. L1 ends that lease itself,
    at the handler's cancellation or when it replies past the deadline; else identical
    requests waited on it for the whole age limit (30 s), then each led a call of its own."""
    cache = leased_cache()
    server, port = await start(SemanticCacheService(SemanticCacheApi(cache, lease_wait_s=30.0)))
    lookup = sc.LookupRequest(
        tenant="a", request=make_request("Reset my password"), want_embedding=True
    )
    # a request_id, as a router sends: the lease is ended only as this request's (an empty
    # one would hide an end naming the wrong request: the lease's owner is then '' too)
    lookup.request.request_id = "r1"
    twin = query_from_request("a", lookup.request)
    embedding = cache.embedding
    handled = asyncio.Event()

    async def stalled(*args: Any, **kwargs: Any) -> object:
        try:
            if stall == "awaits":
                await asyncio.sleep(5.0)  # cancelled at the deadline
            vector = await embedding(*args, **kwargs)
            if stall == "blocks the loop":
                time.sleep(0.5)  # noqa: ASYNC251 (the busy loop: no await left, the reply is late)
            return vector
        finally:
            handled.set()

    monkeypatch.setattr(cache, "embedding", stalled)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = sc_grpc.SemanticCacheStub(channel)
            late = stub.Lookup(lookup, metadata=AUTH, timeout=0.2)
            await expect(grpc.StatusCode.DEADLINE_EXCEEDED, late)
            await asyncio.wait_for(handled.wait(), 10)  # a safety net only
            monkeypatch.setattr(cache, "embedding", embedding)
            other = sc.LookupRequest(tenant="a", request=make_request("Another question"))
            await stub.Lookup(other, metadata=AUTH)  # the late handler has finished by now
            assert not cache.lease_pending(twin)
            again = await stub.Lookup(lookup, metadata=AUTH, timeout=5.0)
            assert again.leader  # at once, not in 30 s
    finally:
        await server.stop(None)


def test_an_internal_token_grpc_cannot_carry_is_refused_at_start_up() -> None:
    """A token with an accented letter or a byte-order mark was accepted, and no caller could
    then send it (every internal call UNAUTHENTICATED)."""
    for unsendable in ("short", "internal-tökén-of-the-stack", "\ufeff" + TOKEN):
        with pytest.raises(ConfigError, match="CACHEMESH_INTERNAL_TOKEN") as refused:
            InternalAuthInterceptor(unsendable)
        assert "tök" not in str(refused.value) and TOKEN not in str(refused.value)
    InternalAuthInterceptor(TOKEN)
