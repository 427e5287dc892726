"""Identical requests whose answer is never stored call the model side by side, not in turn.

A leader's Store that stores nothing because of what the answer is (cut at the request's
``max_tokens``, a refusal, a tool call its namespace does not cache, too large) marks its key
for a while: the waiters it wakes, and identical lookups arriving meanwhile, neither wait nor
lead (each calls the model at once). Before, one woken waiter led the next call and the others
waited on it in turn: the k-th of n identical requests waited k - 1 whole model calls for an
answer that was never going to be stored. A leader whose call failed (Release) is still
followed by one call, not one per waiter (``test_semantic_cache_lease_handover.py``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import semantic_cache_pb2 as sc
from services.common.clock import ManualClock
from services.model.providers.progress import tool_use_chunk
from services.semantic_cache.api import SemanticCacheApi
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.leases import UNCACHEABLE_S, Leases
from services.semantic_cache.policy import NamespacePolicy
from tests.unit.semantic_cache_support import FakeEmbedder, make_request

QUESTION = "Describe the baggage rules in detail."


def answer(stop_reason: str = "end_turn", output_tokens: int = 19) -> sc.CachedAnswer:
    return sc.CachedAnswer(
        content=[pb.ContentBlock(text="Each passenger may bring one bag of")],
        model="sim-large",
        stop_reason=stop_reason,
        output_tokens=output_tokens,
    )


CUT = answer("max_tokens", 19)  # cut at the request's own max_tokens (19)
WHOLE = answer("end_turn", 12)


class Stack:
    def __init__(self, policy: NamespacePolicy | None = None) -> None:
        self.clock = ManualClock()
        self.leases = Leases(self.clock, 30.0)
        cache = SemanticCache(
            FakeEmbedder(), self.clock, threshold=0.8, leases=self.leases, policy=policy
        )
        self.api = SemanticCacheApi(cache, lease_wait_s=30.0)

    def lookup(self, request: pb.CompleteRequest) -> asyncio.Task[sc.LookupResponse]:
        lookup = sc.LookupRequest(tenant="a", request=request)
        return asyncio.create_task(self.api.lookup(lookup, 20.0))

    async def store(
        self, request: pb.CompleteRequest, answer: sc.CachedAnswer, lease_id: str = ""
    ) -> sc.StoreResponse:
        store = sc.StoreRequest(tenant="a", request=request, answer=answer, lease_id=lease_id)
        return await self.api.store(store)


def cut_request(max_tokens: int = 19, **kwargs: Any) -> pb.CompleteRequest:
    return make_request(QUESTION, temperature=0.0, max_tokens=max_tokens, **kwargs)


async def settle() -> None:
    """Lets every task run until it waits (on a lease: nothing else here waits for long)."""
    for _ in range(10):
        await asyncio.sleep(0)


def calls_the_model_now(reply: sc.LookupResponse) -> bool:
    """A miss that neither leads nor waits on a lease: the router calls the model at once."""
    return not (reply.hit or reply.leader or reply.pending)


async def test_waiters_on_an_answer_cut_at_max_tokens_all_call_the_model_at_once() -> None:
    stack = Stack()
    request = cut_request()
    leader = await stack.lookup(request)
    assert leader.leader
    waiters = [stack.lookup(request) for _ in range(7)]
    await settle()
    assert not any(task.done() for task in waiters)  # they wait on the leader's call
    refused = await stack.store(request, CUT, leader.lease_id)
    assert not refused.stored and "max_tokens" in refused.skip_reason
    await settle()
    # every waiter is woken with a miss of its own (before: one led, six waited on it)
    assert all(task.done() for task in waiters)
    assert all(calls_the_model_now(task.result()) for task in waiters)
    # an identical request arriving now neither waits nor leads either
    late = await asyncio.wait_for(stack.lookup(request), 1)
    assert calls_the_model_now(late)
    # their Stores, refused the same way, take no lease from anyone
    assert not (await stack.store(request, CUT)).stored
    assert len(stack.leases) == 0


async def test_the_mark_ends_after_its_age_and_single_flight_resumes() -> None:
    stack = Stack()
    request = cut_request()
    leader = await stack.lookup(request)
    await stack.store(request, CUT, leader.lease_id)
    stack.clock.advance(s=UNCACHEABLE_S - 0.001)
    assert calls_the_model_now(await stack.lookup(request))
    stack.clock.advance(s=0.001)
    assert (await stack.lookup(request)).leader  # the next answer may be stored: it leads


async def test_a_larger_max_tokens_still_leads_and_a_stored_answer_clears_the_mark() -> None:
    """The mark of a cut answer holds for requests with at most that ``max_tokens`` (max_tokens
    is not part of the key): one allowing more may get a whole answer, so it leads, and an
    answer stored for the key ends the mark."""
    stack = Stack()
    request = cut_request()
    leader = await stack.lookup(request)
    await stack.store(request, CUT, leader.lease_id)
    assert calls_the_model_now(await stack.lookup(cut_request(max_tokens=10)))
    larger = await stack.lookup(cut_request(max_tokens=1024))
    assert larger.leader
    stored = await stack.store(cut_request(max_tokens=1024), WHOLE, larger.lease_id)
    assert stored.stored
    assert (await stack.lookup(request)).hit  # 12 tokens fit in 19
    assert (await stack.lookup(cut_request(max_tokens=10))).leader  # no mark any more


async def test_an_answer_cut_short_of_its_own_limit_keeps_the_waiters_taking_turns() -> None:
    """``max_tokens`` short of the request's limit is an aborted call (vLLM's ``abort``, an
    unknown finish reason): the next one may end whole, so one waiter leads it, as after a
    failed call."""
    stack = Stack()
    request = cut_request(max_tokens=1024)
    leader = await stack.lookup(request)
    waiters = [stack.lookup(request) for _ in range(3)]
    await settle()
    await stack.store(request, CUT, leader.lease_id)  # 19 of 1024 tokens
    await settle()
    woken = [task.result() for task in waiters if task.done()]
    assert len(woken) == 1 and woken[0].leader
    for task in waiters:
        task.cancel()


async def test_a_refusal_and_a_tool_call_its_namespace_does_not_cache_mark_the_key() -> None:
    stack = Stack()
    request = make_request("How do I pick a lock?", temperature=0.0)
    leader = await stack.lookup(request)
    assert not (await stack.store(request, answer("refusal"), leader.lease_id)).stored
    assert calls_the_model_now(await stack.lookup(request))
    call = sc.CachedAnswer(
        content=[pb.ContentBlock(tool_use=pb.ToolUse(id="t1", name="search"))],
        stop_reason="tool_use",
        output_tokens=9,
    )
    request = make_request("Find me a flight to Oslo", temperature=0.0)
    leader = await stack.lookup(request)
    refused = await stack.store(request, call, leader.lease_id)
    assert not refused.stored
    assert calls_the_model_now(await stack.lookup(request))


async def test_a_tool_call_whose_arguments_are_not_json_is_not_stored_and_marks_nothing() -> None:
    """A tool call whose arguments the model wrote as broken JSON (kept by the model adapter as
    ``{"_unparsed_arguments": ...}``) still ends ``tool_use``. In a namespace that caches tool
    calls it was stored and served for the whole TTL to the question and its paraphrases:
    every agent asking got the same unusable call. It is not stored now, and marks nothing:
    the next sample may be whole, so one waiter leads it and its answer is stored."""
    stack = Stack(NamespacePolicy(tool_use_namespaces=frozenset({"agent-readonly"})))
    request = make_request("Show me the app config file", namespace="agent-readonly")
    request.temperature = 0.0
    broken = sc.CachedAnswer(
        content=[tool_use_chunk("call_1", "read_file", '{"path": "/etc/app.co').block],
        model="sim-large",
        stop_reason="tool_use",
        output_tokens=9,
    )
    leader = await stack.lookup(request)
    waiters = [stack.lookup(request) for _ in range(3)]
    await settle()
    refused = await stack.store(request, broken, leader.lease_id)
    assert not refused.stored
    assert refused.skip_reason == "the model's tool call arguments are not JSON"
    await settle()
    woken = [task.result() for task in waiters if task.done()]
    assert len(woken) == 1 and woken[0].leader  # not marked: the next call may be stored
    for task in waiters:
        task.cancel()
    whole = sc.CachedAnswer(
        content=[tool_use_chunk("call_2", "read_file", '{"path": "/etc/app.conf"}').block],
        model="sim-large",
        stop_reason="tool_use",
        output_tokens=9,
    )
    assert (await stack.store(request, whole, woken[0].lease_id)).stored
    assert (await stack.lookup(request)).hit


async def test_a_store_refused_for_the_moment_marks_nothing() -> None:
    """Refused because of when it came (the tenant's entries were purged after its lookup):
    the next identical answer may be stored, so the next request leads."""
    stack = Stack()
    request = make_request("How do I reset my password?")
    request.request_id = "r1"
    leader = await stack.lookup(request)
    await stack.api.drop(sc.DropRequest(tenant="a"))
    refused = await stack.store(request, WHOLE, leader.lease_id)
    assert not refused.stored and "invalidated" in refused.skip_reason
    assert (await stack.lookup(make_request("How do I reset my password?"))).leader


def test_the_marks_are_bounded_and_shared_fairly_between_tenants() -> None:
    clock = ManualClock()
    leases = Leases(clock, 30.0, marks_kept=8)
    leases.mark_uncacheable(("b", "scope", "b's question"))
    for i in range(100):
        leases.mark_uncacheable(("a", "scope", f"question {i}"))
    assert leases.marks() == 8
    assert leases.uncacheable(("b", "scope", "b's question"), 10)  # a's flood kept b's
    assert leases.uncacheable(("a", "scope", "question 99"), 10)
    assert not leases.uncacheable(("a", "scope", "question 0"), 10)
    assert not leases.uncacheable(("a", "other scope", "question 99"), 10)
    clock.advance(s=UNCACHEABLE_S)
    assert not leases.uncacheable(("b", "scope", "b's question"), 10)
    assert leases.marks() == 7  # an expired mark read is dropped


def test_a_mark_of_a_cut_answer_holds_up_to_the_largest_limit_cut() -> None:
    leases = Leases(ManualClock(), 30.0)
    key = ("a", "scope", "question")
    leases.mark_uncacheable(key, up_to_max_tokens=19)
    assert leases.uncacheable(key, 19) and not leases.uncacheable(key, 20)
    leases.mark_uncacheable(key, up_to_max_tokens=50)
    assert leases.uncacheable(key, 50) and not leases.uncacheable(key, 51)
    leases.mark_uncacheable(key, up_to_max_tokens=30)  # a smaller cut narrows nothing
    assert leases.uncacheable(key, 50)
    leases.mark_uncacheable(key)  # a refusal: whatever the limit
    assert leases.uncacheable(key, 100_000)
    leases.clear_uncacheable(key)
    assert not leases.uncacheable(key, 1)
