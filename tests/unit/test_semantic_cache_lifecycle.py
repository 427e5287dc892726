"""Lifecycle: TTL per namespace, store rules per namespace, invalidation, single flight."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from services.common.clock import ManualClock
from services.common.env import ConfigError, Env
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.leases import Leases
from services.semantic_cache.policy import NamespacePolicy
from tests.unit.semantic_cache_support import FakeEmbedder
from tests.unit.test_semantic_cache_rules import answer, q

POLICY = NamespacePolicy(
    ttl_s=100.0,
    namespace_ttl_s={"news": 10.0},
    tool_use_namespaces=frozenset({"agent"}),
    present_time_namespaces=frozenset({"news"}),  # "latest headlines today": for 10 s
)


def new_cache(
    hold_s: float = 30.0, policy: NamespacePolicy = POLICY
) -> tuple[SemanticCache, ManualClock]:
    clock = ManualClock()
    leases = Leases(clock, hold_s)
    return SemanticCache(FakeEmbedder(), clock, threshold=0.8, policy=policy, leases=leases), clock


async def test_each_namespace_has_its_own_ttl_fixed_at_store() -> None:
    cache, clock = new_cache()
    await cache.store(q("latest headlines today", namespace="news"), answer())
    await cache.store(q("how do i reset my password"), answer())
    clock.advance(s=9.999)
    assert (await cache.check(q("latest headlines today", namespace="news"))).hit
    clock.advance(s=0.001)
    assert not (await cache.check(q("latest headlines today", namespace="news"))).hit
    clock.advance(s=89.999)
    assert (await cache.check(q("how do i reset my password"))).hit
    clock.advance(s=0.001)
    assert not (await cache.check(q("how do i reset my password"))).hit
    assert len(cache) == 0


async def test_tool_calls_are_stored_and_served_only_where_the_namespace_allows() -> None:
    """A tool call ends its turn with stop_reason ``tool_use`` (every provider says so): in a
    namespace of SEMANTIC_CACHE_TOOL_USE_NAMESPACES it is a whole answer, stored and served.
    Before, the Store refused anything but ``end_turn`` before it read the namespace rule, so
    nothing was ever cached there (the test stored a tool call ending ``end_turn``, which no
    provider sends)."""
    cache, _ = new_cache()
    call = answer(stop_reason="tool_use", has_tool_use=True)
    refused = await cache.store(q("book the flight", namespace="faq"), call)
    assert not refused.stored and "does not allow" in refused.skip_reason
    tool_only = answer(stop_reason="tool_use", has_tool_use=True, has_text=False)  # an answer
    kept = await cache.store(q("book the flight", namespace="agent"), tool_only)
    assert kept.stored, kept.skip_reason
    assert (await cache.check(q("book the flight", namespace="agent"))).hit
    assert (await cache.check(q("book the flight please", namespace="agent"))).hit  # paraphrase
    assert not (await cache.check(q("book the flight", namespace="faq"))).hit


@pytest.mark.parametrize(
    ("stop_reason", "has_tool_use"),
    [("max_tokens", True), ("refusal", True), ("tool_use", False), ("", True)],
)
async def test_a_tool_namespace_still_refuses_cut_refused_and_callless_answers(
    stop_reason: str, has_tool_use: bool
) -> None:
    """Only a whole turn is stored there: a call cut at max_tokens, a refusal, and a
    ``tool_use`` stop without a tool call are not."""
    cache, _ = new_cache()
    result = await cache.store(
        q("book the flight", namespace="agent"),
        answer(stop_reason=stop_reason, has_tool_use=has_tool_use),
    )
    assert not result.stored and "stop_reason" in result.skip_reason
    assert len(cache) == 0


@pytest.mark.parametrize(("temperature", "stored"), [(0.0, True), (0.7, True), (0.71, False)])
async def test_answers_sampled_above_the_cacheable_temperature_are_never_stored(
    temperature: float, stored: bool
) -> None:
    cache, _ = new_cache(policy=NamespacePolicy(max_temperature=0.7))
    result = await cache.store(q("write me a poem", temperature=temperature), answer())
    assert result.stored is stored
    assert stored or "cacheable limit" in result.skip_reason
    unset = await cache.store(q("write me a haiku"), answer())  # unset temperature = 1.0
    assert not unset.stored


async def test_invalidate_one_entry_only_for_its_tenant() -> None:
    cache, _ = new_cache()
    kept = await cache.store(q("how do i reset my password"), answer())
    other = await cache.store(q("how do i cancel my plan"), answer())
    assert await cache.drop_entry("b", kept.entry_id) == 0  # not tenant b's entry
    assert await cache.drop_entry("a", "no-such-entry") == 0
    assert await cache.drop_entry("a", kept.entry_id) == 1
    assert await cache.drop_entry("a", kept.entry_id) == 0
    assert not (await cache.check(q("how do i reset my password"))).hit
    served = (await cache.check(q("how do i cancel my plan"))).entry
    assert served is not None and served.entry_id == other.entry_id


async def test_concurrent_identical_misses_share_one_model_call() -> None:
    cache, _ = new_cache()
    leader = await cache.check(q("how do i reset my password"), wait_s=5.0)
    assert leader.leader and not leader.hit
    waiters = [
        asyncio.create_task(cache.check(q("how do i reset my password"), wait_s=5.0))
        for _ in range(3)
    ]
    await asyncio.sleep(0)  # the waiters are now blocked on the lease
    assert not any(task.done() for task in waiters)
    await cache.store(q("how do i reset my password"), answer(b"the answer"))
    results = await asyncio.gather(*waiters)
    assert all(r.hit and r.waited and not r.leader for r in results)
    assert {r.entry.answer.payload for r in results if r.entry} == {b"the answer"}


async def test_a_store_that_does_not_store_hands_the_lease_to_one_waiter() -> None:
    cache, _ = new_cache()
    assert (await cache.check(q("summarise this page"), wait_s=5.0)).leader
    waiter = asyncio.create_task(cache.check(q("summarise this page"), wait_s=5.0))
    await asyncio.sleep(0)
    truncated = await cache.store(q("summarise this page"), answer(stop_reason="max_tokens"))
    assert not truncated.stored
    result = await waiter
    assert not result.hit and result.leader  # it now makes the call itself


async def test_a_waiter_out_of_budget_misses_and_an_abandoned_lease_expires() -> None:
    cache, clock = new_cache(hold_s=30.0)
    assert (await cache.check(q("how do i reset my password"), wait_s=1.0)).leader
    impatient = await cache.check(q("how do i reset my password"), wait_s=0.0)
    assert not impatient.hit and not impatient.leader
    clock.advance(s=30.0)  # the leader died without a Store
    assert (await cache.check(q("how do i reset my password"), wait_s=0.0)).leader


def test_abandoned_leases_of_keys_nobody_asks_again_are_ended_as_new_ones_are_taken() -> None:
    """Routers that died (or whose release was lost) leave leases behind, each holding its
    question: they end at their age limit even if their keys never come back."""
    clock = ManualClock()
    leases = Leases(clock, hold_s=30.0)
    for i in range(1_000):
        leases.take(("t", "scope", f"question {i}"), owner=f"r{i}")
    clock.advance(s=15.0)
    assert leases.take_over(("t", "scope", "question 0"), "r0")  # a retry: 30 s from now
    clock.advance(s=15.0)
    leases.take(("t", "scope", "a new question"))
    assert len(leases) == 2  # the retried one and the new one
    clock.advance(s=30.0)  # both expired
    leases.take(("t", "scope", "question 0"))  # a new lease of an expired key
    leases.take(("t", "scope", "another"))
    assert len(leases) == 2
    clock.advance(s=30.0)
    leases.take(("t", "scope", "last"))
    assert len(leases) == 1


async def test_no_store_and_other_scopes_never_take_or_share_a_lease() -> None:
    from cachemesh.v1 import gateway_pb2 as pb

    cache, _ = new_cache()
    peek = await cache.check(q("how do i reset my password", mode=pb.SEMANTIC_MODE_NO_STORE))
    assert not peek.leader
    assert (await cache.check(q("how do i reset my password"), wait_s=0.0)).leader
    assert (await cache.check(q("how do i reset my password", tenant="b"), wait_s=0.0)).leader
    assert (await cache.check(q("how do i reset my password", model="x"), wait_s=0.0)).leader


def test_policy_from_env_names_the_variable() -> None:
    policy = NamespacePolicy.from_env(
        Env(
            {
                "SEMANTIC_CACHE_NAMESPACE_TTL_S": "news=600, faq=1.5",
                "SEMANTIC_CACHE_TOOL_USE_NAMESPACES": "agent,ops",
                "SEMANTIC_CACHE_PRESENT_TIME_NAMESPACES": "news",
                "SEMANTIC_CACHE_MAX_TEMPERATURE": "0",
            }
        ),
        86_400.0,
    )
    assert policy.ttl_ms("news") == 600_000 and policy.ttl_ms("faq") == 1500
    assert policy.ttl_ms("other") == 86_400_000
    assert policy.allows_tool_use("ops") and not policy.allows_tool_use("faq")
    assert not policy.present_time_reason("news", "latest headlines today")
    assert "present" in policy.present_time_reason("faq", "latest headlines today")
    assert policy.max_temperature == 0.0
    # 5e-324 and 0.5 s were taken: entries that expired as they were stored (whole ms)
    for bad in ("news", "news=0", "=5", "news=abc", "news=5e-324", "news=0.5"):
        with pytest.raises(ConfigError, match="SEMANTIC_CACHE_NAMESPACE_TTL_S") as caught:
            NamespacePolicy.from_env(Env({"SEMANTIC_CACHE_NAMESPACE_TTL_S": bad}), 1.0)
        if "=" in bad and bad[0] != "=":
            assert "at least 1 s and at most 315360000 s" in str(caught.value)


async def test_a_query_whose_answer_could_never_be_stored_takes_no_lease() -> None:
    cache, _ = new_cache(policy=NamespacePolicy(max_temperature=0.7))
    hot = q("how do i reset my password", temperature=0.9)
    assert not (await cache.check(hot)).leader  # its Store would store nothing
    assert not cache.lease_pending(hot)
    assert (await cache.check(q("how do i reset my password", temperature=0.7))).leader


async def test_a_release_names_its_lease_and_keeps_a_newer_one() -> None:
    cache, clock = new_cache(hold_s=1.0)
    query = q("how do i reset my password")
    first = await cache.check(query)
    assert first.leader and first.lease_id
    clock.advance(s=1.0)  # the first leader's lease has expired: the next lookup leads
    second = await cache.check(query)
    assert second.leader and second.lease_id != first.lease_id
    assert not cache.release(query, first.lease_id)  # the late Release of the first leader
    assert cache.lease_pending(query)
    assert cache.release(query, second.lease_id) and not cache.lease_pending(query)


async def test_a_retry_of_the_leaders_own_request_leads_again_instead_of_waiting() -> None:
    """The leader's router died mid-call; the client retried the request (same request_id)
    through another router: it takes its own lease over at once, while a different request
    still waits for it and is served the retry's Store."""
    cache, clock = new_cache(hold_s=30.0)
    mine = dataclasses.replace(q("how do i reset my password"), request_id="req-1")
    other = dataclasses.replace(q("how do i reset my password"), request_id="req-2")
    first = await cache.check(mine, wait_s=5.0)
    assert first.leader
    clock.advance(s=20.0)
    retry = await cache.check(mine, wait_s=5.0, retry=True)  # else it waits: the lease is live
    assert retry.leader and retry.lease_id != first.lease_id  # its lease, under a new id
    waiter = asyncio.create_task(cache.check(other, wait_s=5.0))
    await asyncio.sleep(0)
    assert not waiter.done()
    clock.advance(s=20.0)  # past the first call's age limit: the take-over restarted it
    assert cache.lease_pending(other)
    await cache.store(mine, answer(b"the retry's answer"))
    served = await waiter
    assert served.hit and served.entry is not None
    assert served.entry.answer.payload == b"the retry's answer"
    unnamed = await cache.check(q("what is the baggage allowance"), wait_s=0.0)
    assert unnamed.leader  # no request_id: nothing to take over, as before
    assert not (await cache.check(q("what is the baggage allowance"), wait_s=0.0)).leader


async def test_a_duplicate_with_the_leaders_request_id_not_marked_a_retry_waits_on_its_lease() -> (
    None
):
    """Two routers got the same request_id at once, neither marked a retry (grpcurl sends it
    twice): the second took the first's lease over and led a second model call, where two
    different ids made one. Now it waits on the lease like any identical request and is
    served the first call's Store; only a Lookup marked a retry takes the lease over."""
    cache, _ = new_cache(hold_s=30.0)
    mine = dataclasses.replace(q("how do i reset my password"), request_id="req-1")
    first = await cache.check(mine, wait_s=5.0)
    assert first.leader
    duplicate = asyncio.create_task(cache.check(mine, wait_s=5.0))
    await asyncio.sleep(0)
    assert not duplicate.done()  # waits: it does not lead a call of its own
    await cache.store(mine, answer(b"the first call's answer"), lease_id=first.lease_id)
    served = await duplicate
    assert served.hit and not served.leader and served.entry is not None
    assert served.entry.answer.payload == b"the first call's answer"
