"""A leader that fails hands its lease to one waiter; the other waiters wait on that one.

Five identical concurrent misses, as the router makes them (a hit is served; a leader calls the
model then stores or, its call failed, releases; any other miss calls the model and stores):
the first leader's call fails, so one more model call is needed, and only one. Before, every
waiter woke at the release, one took the lease and the others got ``pending`` back, which the
router's second Lookup answers with a model call of its own: four calls instead of one.
"""

from __future__ import annotations

import asyncio
from typing import Any

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import semantic_cache_pb2 as sc
from services.common.clock import ManualClock
from services.semantic_cache.api import SemanticCacheApi
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.leases import Leases
from tests.unit.semantic_cache_support import FakeEmbedder, make_request

ANSWER = sc.CachedAnswer(
    content=[pb.ContentBlock(text="Open Settings, then Security.")],
    model="sim-small",
    stop_reason="end_turn",
    output_tokens=12,
)


def leased_api() -> SemanticCacheApi:
    clock = ManualClock()  # the leases' age limit never passes: only Store and Release end them
    cache = SemanticCache(FakeEmbedder(), clock, threshold=0.8, leases=Leases(clock, 30.0))
    return SemanticCacheApi(cache, lease_wait_s=30.0)


class Requests:
    """Identical requests, each handled as the router does with L1's answers."""

    def __init__(self, api: SemanticCacheApi, question: str) -> None:
        self._api = api
        self.request = make_request(question)
        self.model_calls = 0
        self.served_from_cache = 0

    def lookup(self) -> sc.LookupRequest:
        return sc.LookupRequest(tenant="a", request=self.request)

    async def answered(self, reply: sc.LookupResponse) -> None:
        if reply.hit:
            self.served_from_cache += 1
            return
        self.model_calls += 1  # a leader, or a miss still pending: the model answers it
        await asyncio.sleep(0)  # the model call
        store = sc.StoreRequest(tenant="a", request=self.request, answer=ANSWER)
        await self._api.store(store)

    async def run(self) -> None:
        await self.answered(await self._api.lookup(self.lookup(), 20.0))


async def settle() -> None:
    """Lets every task run until it waits (on a lease: nothing else here waits for long)."""
    for _ in range(10):
        await asyncio.sleep(0)


async def waiting(tasks: list[asyncio.Task[Any]]) -> None:
    """Lets the tasks reach their lease wait."""
    await settle()
    assert not any(task.done() for task in tasks)


async def test_a_failed_leader_is_followed_by_one_model_call_not_one_per_waiter() -> None:
    api = leased_api()
    requests = Requests(api, "How do I reset my password?")
    leader = await api.lookup(requests.lookup(), 20.0)
    assert leader.leader
    requests.model_calls += 1  # ... and its model call fails
    waiters = [asyncio.create_task(requests.run()) for _ in range(4)]
    await waiting(waiters)
    release = sc.ReleaseRequest(tenant="a", request=requests.request, lease_id=leader.lease_id)
    assert (await api.release(release)).released
    await asyncio.wait_for(asyncio.gather(*waiters), 10)
    assert requests.model_calls == 2  # the failed one and the new leader's
    assert requests.served_from_cache == 3


async def test_a_chain_of_failed_leaders_still_ends_in_one_call_per_failure() -> None:
    """The new leader fails too: again one waiter leads, the others keep waiting on it."""
    api = leased_api()
    requests = Requests(api, "How do I reset my password?")
    first = await api.lookup(requests.lookup(), 20.0)
    waiters = [asyncio.create_task(api.lookup(requests.lookup(), 20.0)) for _ in range(4)]
    await waiting(waiters)
    release = sc.ReleaseRequest(tenant="a", request=requests.request, lease_id=first.lease_id)
    assert (await api.release(release)).released
    await settle()
    woken = [task.result() for task in waiters if task.done()]
    assert len(woken) == 1 and woken[0].leader  # one leads, three wait on
    release.lease_id = woken[0].lease_id
    assert (await api.release(release)).released
    await settle()
    woken = [task.result() for task in waiters if task.done()]
    assert [reply.leader for reply in woken] == [True, True]
    store = sc.StoreRequest(tenant="a", request=requests.request, answer=ANSWER)
    assert (await api.store(store)).stored
    replies = await asyncio.wait_for(asyncio.gather(*waiters), 10)
    assert sum(reply.hit and reply.waited for reply in replies) == 2
    assert not any(reply.pending for reply in replies)
