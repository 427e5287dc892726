"""Who ends a lease. By a Release naming its id alone, only the Lookup that took it under
that id: a second Lookup proposing an id a live lease has already is given an id of L1's
(``Leases._id``), or waits on it; its Release by the id it proposed (its reply lost: it knows
no other) named the first one's lease, and ended it: that request's identical requests then
led model calls of their own while it still ran. And a leader's Store ends its lease even when
it is refused, or cancelled, before it is read: the router renews the lease no more once it
sends its Store, so the identical requests waited on it up to its age limit."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import semantic_cache_pb2 as sc
from services.common.clock import ManualClock
from services.common.errors import Code, RequestError
from services.semantic_cache.api import SemanticCacheApi
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.leases import Leases
from services.semantic_cache.query import Query, RecentQueries, query_from_request
from tests.unit.semantic_cache_support import FakeEmbedder, make_request

PROPOSED = "a" * 32


def _request(question: str, request_id: str) -> pb.CompleteRequest:
    request = make_request(question)
    request.request_id = request_id
    return request


def _held(cache: SemanticCache, request: pb.CompleteRequest) -> bool:
    return cache.lease_pending(query_from_request("a", request))


def _api() -> tuple[SemanticCacheApi, SemanticCache]:
    clock = ManualClock()
    cache = SemanticCache(FakeEmbedder(), clock, threshold=0.8, leases=Leases(clock, 30.0))
    return SemanticCacheApi(cache, lease_wait_s=0.0), cache


def _lookup(
    api: SemanticCacheApi, request: pb.CompleteRequest, lease_id: str = PROPOSED
) -> Coroutine[Any, Any, sc.LookupResponse]:
    """Tenant a's Lookup of ``request`` proposing ``lease_id``."""
    return api.lookup(sc.LookupRequest(tenant="a", request=request, lease_id=lease_id), 5.0)


async def _cancelled_while_derived(
    monkeypatch: pytest.MonkeyPatch, call: Coroutine[Any, Any, object]
) -> None:
    """Runs ``call`` until its query is being derived (a large request's, in a worker thread
    after the other tenants' walks: ``RecentQueries.derived``, held here), then cancels it:
    it ends cancelled."""
    queued = asyncio.Event()

    async def behind_others(*_: object, **__: object) -> Query:
        queued.set()
        await asyncio.Event().wait()  # never: the call is cancelled first
        raise AssertionError("not reached")

    monkeypatch.setattr(RecentQueries, "derived", behind_others)
    task = asyncio.ensure_future(call)
    await queued.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_release_by_a_proposed_id_another_lease_has_ends_nothing_of_it() -> None:
    api, cache = _api()
    first = _request("How do I reset my password?", "r1")
    second = _request("What is the capital of France?", "r2")
    led = await _lookup(api, first)
    assert led.leader and led.lease_id == PROPOSED
    other = await _lookup(api, second)
    assert other.leader and other.lease_id != PROPOSED  # the id is the first one's
    # the second's reply lost: it releases by the id it proposed, all it knows
    released = await api.release(sc.ReleaseRequest(tenant="a", lease_id=PROPOSED))
    assert not released.released
    assert _held(cache, first), "the first request's lease was ended"
    # the first one's own Release (with its request) and Renew still work
    assert (await api.renew(sc.RenewRequest(tenant="a", lease_id=PROPOSED))).renewed
    mine = await api.release(sc.ReleaseRequest(tenant="a", request=first, lease_id=PROPOSED))
    assert mine.released
    # the second lease, under L1's id, is ended by it
    assert (await api.release(sc.ReleaseRequest(tenant="a", lease_id=other.lease_id))).released


async def test_a_release_by_id_alone_of_an_uncontested_lease_still_ends_it() -> None:
    api, cache = _api()
    first = _request("How do I reset my password?", "r1")
    led = await _lookup(api, first)
    assert led.leader
    assert (await api.release(sc.ReleaseRequest(tenant="a", lease_id=PROPOSED))).released
    assert not _held(cache, first)


async def test_a_waiter_proposing_the_leaders_id_cannot_release_its_lease() -> None:
    """An identical request that proposed the leader's id waits (here: no wait, pending), it
    holds no lease: its Release by that id alone ended the leader's."""
    api, cache = _api()
    first = _request("How do I reset my password?", "r1")
    same = _request("How do I reset my password?", "r2")
    led = await _lookup(api, first)
    assert led.leader and led.lease_id == PROPOSED
    waiting = await _lookup(api, same)
    assert waiting.pending and not waiting.leader
    assert not (await api.release(sc.ReleaseRequest(tenant="a", lease_id=PROPOSED))).released
    assert _held(cache, first)


async def test_a_duplicate_of_the_leaders_own_lookup_may_still_release_it() -> None:
    """The same request's Lookup sent twice (its first reply lost, sent again): the lease is
    its own request's, and its Release by the id it proposed ends it, as before."""
    api, cache = _api()
    first = _request("How do I reset my password?", "r1")
    led = await _lookup(api, first)
    again = await _lookup(api, first)
    assert led.leader and again.pending
    assert (await api.release(sc.ReleaseRequest(tenant="a", lease_id=PROPOSED))).released
    assert not _held(cache, first)


async def test_a_store_refused_before_it_is_read_still_ends_its_lease() -> None:
    """A Store the API refuses (INVALID_ARGUMENT: output_tokens < 0) is the leader's last
    word on its lease (the router stops renewing once it sends its Store): it ended nothing,
    so the identical requests waited on the lease up to its age limit."""
    api, cache = _api()
    first = _request("How do I reset my password?", "r1")
    led = await _lookup(api, first)
    assert led.leader
    answer = sc.CachedAnswer(content=[pb.ContentBlock(text="Open Settings.")], output_tokens=-1)
    store = sc.StoreRequest(tenant="a", request=first, answer=answer, lease_id=led.lease_id)
    with pytest.raises(RequestError) as refused:
        await api.store(store)
    assert refused.value.code == Code.INVALID_ARGUMENT
    assert not _held(cache, first), "the refused Store left its lease held"


async def test_a_store_cancelled_while_its_query_is_derived_still_ends_its_lease(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A large request's query is derived in a worker thread, after the other tenants' walks
    (``RecentQueries.derived``); a Store cancelled there (its router's Store deadline passed)
    ended nothing of its lease. The derivation is held here until the cancel."""
    api, cache = _api()
    first = _request("How do I reset my password?", "r1")
    led = await _lookup(api, first)
    assert led.leader
    answer = sc.CachedAnswer(content=[pb.ContentBlock(text="Open Settings.")], output_tokens=3)
    store = sc.StoreRequest(tenant="a", request=first, answer=answer, lease_id=led.lease_id)
    await _cancelled_while_derived(monkeypatch, api.store(store))
    assert not _held(cache, first), "the cancelled Store left its lease held"


async def test_an_abandoned_lookup_ends_its_own_lease_though_its_id_was_proposed_again() -> None:
    """L1 ends the lease of a leading Lookup whose reply does not reach its caller
    (``abandon``): it knows the lease is that Lookup's, so another request's proposal of the
    same id does not keep it."""
    api, cache = _api()
    first = _request("How do I reset my password?", "r1")
    second = _request("What is the capital of France?", "r2")
    led = await _lookup(api, first)
    await _lookup(api, second)
    assert api.abandon("a", led.lease_id, "r1")
    assert not _held(cache, first)


async def test_a_release_cancelled_while_its_query_is_derived_still_ends_its_lease(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As a Store: a Release naming its request and lease, cancelled while a large request's
    query is derived (the router's Release deadline passed), ended nothing."""
    api, cache = _api()
    first = _request("How do I reset my password?", "r1")
    led = await _lookup(api, first)
    assert led.leader
    release = sc.ReleaseRequest(tenant="a", request=first, lease_id=led.lease_id)
    await _cancelled_while_derived(monkeypatch, api.release(release))
    assert not _held(cache, first), "the cancelled Release left its lease held"


async def test_a_lookup_cancelled_before_its_check_cannot_release_the_lease_of_its_id(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Lookup proposing a live lease's id, cancelled while its query is derived (it never
    reached the check): the router releases by that id (its reply lost), which must end
    nothing of the other request's lease."""
    clock = ManualClock()
    leases = Leases(clock, 30.0)
    cache = SemanticCache(FakeEmbedder(), clock, threshold=0.8, leases=leases)
    api = SemanticCacheApi(cache, lease_wait_s=0.0)
    first = _request("How do I reset my password?", "r1")
    led = await _lookup(api, first)
    assert led.leader and led.lease_id == PROPOSED
    second = _request("What is the capital of France?", "r2")
    lookup = sc.LookupRequest(tenant="a", request=second, lease_id=PROPOSED)
    await _cancelled_while_derived(monkeypatch, api.lookup(lookup, 5.0))
    assert not (await api.release(sc.ReleaseRequest(tenant="a", lease_id=PROPOSED))).released
    assert _held(cache, first)
    assert leases.proposals() == 0, "the cancelled Lookup's proposal is kept"


async def test_a_waiter_proposing_the_leaders_id_cannot_release_it_while_it_waits() -> None:
    """An identical request that proposed the leader's id and waits on its lease (a real wait,
    not the 0 s one above): its id was marked contested only at the Lookup's end, so a
    Release by that id alone during the wait ended the leader's lease; the waiter then woke,
    led, and took the id, and the first request's renewals renewed the second's lease."""
    clock = ManualClock()
    cache = SemanticCache(FakeEmbedder(), clock, threshold=0.8, leases=Leases(clock, 30.0))
    api = SemanticCacheApi(cache, lease_wait_s=30.0)
    first = _request("How do I reset my password?", "r1")
    same = _request("How do I reset my password?", "r2")
    led = await _lookup(api, first)
    assert led.leader and led.lease_id == PROPOSED
    waiter = asyncio.ensure_future(_lookup(api, same))
    for _ in range(50):  # until it waits on the lease (its check is past its embedding)
        await asyncio.sleep(0)
    assert not waiter.done()
    released = await api.release(sc.ReleaseRequest(tenant="a", lease_id=PROPOSED))
    assert not released.released, "a Release by the waiter's proposed id ended the leader's"
    assert _held(cache, first)
    # the leader stores: the waiter is served (it never led, nor took the id)
    answer = sc.CachedAnswer(
        content=[pb.ContentBlock(text="Open Settings.")], stop_reason="end_turn", output_tokens=3
    )
    await api.store(sc.StoreRequest(tenant="a", request=first, answer=answer, lease_id=PROPOSED))
    served = await waiter
    assert served.hit and served.waited and not served.leader


async def test_a_lease_taken_under_an_id_a_waiting_lookup_proposed_is_not_released_by_it() -> None:
    """The other order: a Lookup proposes an id no live lease has and waits on its question's
    lease (held under another id); meanwhile another request's Lookup takes a lease under that
    id. The first one's caller, its reply lost, releases by the id it proposed: that ended the
    other request's lease (its id was marked contested only once the first Lookup ended)."""
    clock = ManualClock()
    leases = Leases(clock, 30.0)
    cache = SemanticCache(FakeEmbedder(), clock, threshold=0.8, leases=leases)
    api = SemanticCacheApi(cache, lease_wait_s=30.0)
    holder = _request("How do I reset my password?", "r0")
    same = _request("How do I reset my password?", "r2")
    other = _request("What is the capital of France?", "r1")
    held = await _lookup(api, holder, "b" * 32)
    assert held.leader
    waiter = asyncio.ensure_future(_lookup(api, same))
    for _ in range(50):  # until it waits on the holder's lease
        await asyncio.sleep(0)
    assert not waiter.done()
    led = await _lookup(api, other)
    assert led.leader and led.lease_id == PROPOSED  # no live lease had it
    released = await api.release(sc.ReleaseRequest(tenant="a", lease_id=PROPOSED))
    assert not released.released, "a Release by the waiter's proposed id ended another's lease"
    assert _held(cache, other)
    # the holder of the lease the waiter waits on releases: the waiter leads, under an id of L1's
    assert await api.release(sc.ReleaseRequest(tenant="a", request=holder, lease_id="b" * 32))
    woken = await waiter
    assert woken.leader and woken.lease_id != PROPOSED
    # the other request's own Release (naming its request) still ends its lease
    mine = sc.ReleaseRequest(tenant="a", request=other, lease_id=PROPOSED)
    assert (await api.release(mine)).released
    assert leases.proposals() == 0  # none kept past its Lookup
