"""SemanticCache: TTL, capacity (fair between tenants, LRU within one), what may be stored
and served, replacement, drop."""

from __future__ import annotations

import asyncio
from typing import Any

from cachemesh.v1 import gateway_pb2 as pb
from services.common.clock import ManualClock
from services.semantic_cache.cache import _MISSES_KEPT, SemanticCache
from services.semantic_cache.entries import PURGE_GUARD_MS
from services.semantic_cache.leases import Leases
from services.semantic_cache.policy import present_time
from services.semantic_cache.query import Query, query_from_request
from services.semantic_cache.records import Answer
from tests.unit.semantic_cache_support import FakeEmbedder, make_request, within

TTL_S = 60.0


def answer(
    payload: bytes = b"a",
    *,
    stop_reason: str = "end_turn",
    output_tokens: int = 40,
    has_tool_use: bool = False,
    has_text: bool = True,
) -> Answer:
    return Answer(payload, stop_reason, output_tokens, has_tool_use, has_text)


def q(question: str, tenant: str = "a", **kwargs: Any) -> Query:
    return query_from_request(tenant, make_request(question, **kwargs))


def new_cache(max_entries: int = 100) -> tuple[SemanticCache, ManualClock, FakeEmbedder]:
    clock, embedder = ManualClock(), FakeEmbedder()
    cache = SemanticCache(embedder, clock, threshold=0.8, ttl_s=TTL_S, max_entries=max_entries)
    return cache, clock, embedder


async def test_ttl_is_an_absolute_age_that_reads_do_not_extend() -> None:
    cache, clock, _ = new_cache()
    assert (await cache.store(q("reset my password"), answer())).stored
    clock.advance(s=TTL_S - 1)
    assert (await cache.check(q("reset my password"))).hit
    assert (await cache.check(q("reset my password please"))).hit
    clock.advance(s=1)  # exactly TTL old: stale, however recently it was read
    assert not (await cache.check(q("reset my password"))).hit
    assert not (await cache.check(q("reset my password please"))).hit
    assert len(cache) == 0  # purged, not only hidden


async def test_expired_entries_are_purged_on_store() -> None:
    cache, clock, _ = new_cache()
    await cache.store(q("first question"), answer())
    clock.advance(s=TTL_S)
    await cache.store(q("second question", tenant="b"), answer())
    assert len(cache) == 1


async def test_capacity_evicts_the_least_recently_used_entry() -> None:
    cache, _, _ = new_cache(max_entries=2)
    await cache.store(q("alpha question"), answer(b"alpha"))
    await cache.store(q("beta question"), answer(b"beta"))
    assert (await cache.check(q("alpha question"))).hit  # alpha is now the most recent
    await cache.store(q("gamma question"), answer(b"gamma"))
    assert len(cache) == 2
    assert not (await cache.check(q("beta question"))).hit
    assert (await cache.check(q("alpha question"))).hit
    assert (await cache.check(q("gamma question"))).hit


async def test_between_tenants_holding_as_many_the_least_recently_used_entry_goes() -> None:
    cache, _, _ = new_cache(max_entries=2)
    await cache.store(q("alpha question"), answer(b"alpha"))
    await cache.store(q("beta question", tenant="b"), answer(b"beta"))
    assert (await cache.check(q("alpha question"))).hit  # alpha is now the most recent
    await cache.store(q("gamma question", tenant="c"), answer(b"gamma"))
    assert cache.stats.entries == {"a": 1, "c": 1}
    assert not (await cache.check(q("beta question", tenant="b"))).hit


async def test_a_tenant_flooding_the_cache_evicts_its_own_entries_not_another_tenants() -> None:
    """Over capacity the tenant holding the most entries loses its least recently used one: a
    tenant holding fewer keeps every answer, however many new questions another one asks."""
    cache, _, _ = new_cache(max_entries=10)
    faq = ["how do i reset my password", "what is the refund policy", "where is my invoice"]
    for question in faq:
        await cache.store(q(question, tenant="b"), answer(b"faq"))
    for i in range(40):
        await cache.store(q(f"tell me fact {i} about planet x{i}"), answer(b"junk"))
    assert cache.stats.entries == {"a": 7, "b": 3}
    assert cache.stats.evictions == 33
    for question in faq:
        assert (await cache.check(q(question, tenant="b"))).exact
    for i in range(40):  # a's 7 most recent are left
        hit = (await cache.check(q(f"tell me fact {i} about planet x{i}"))).exact
        assert hit == (i >= 33), i


async def test_capacity_is_shared_max_min_fair_and_lru_within_each_tenant() -> None:
    """b filled most of the cache first; a's new entries take b's least recently used ones
    until a holds as many, then its own: each ends with half, its most recently used."""
    cache, _, _ = new_cache(max_entries=10)
    for i in range(8):
        await cache.store(q(f"b question {i} about x{i}", tenant="b"), answer(b"b"))
    assert (await cache.check(q("b question 0 about x0", tenant="b"))).exact  # now b's newest
    for i in range(8):
        await cache.store(q(f"a question {i} about y{i}"), answer(b"a"))
    assert cache.stats.entries == {"a": 5, "b": 5}
    b_kept = {0, 4, 5, 6, 7}  # 1, 2, 3 were b's least recently used
    for i in range(8):
        assert (await cache.check(q(f"b question {i} about x{i}", tenant="b"))).exact == (
            i in b_kept
        ), i
        assert (await cache.check(q(f"a question {i} about y{i}"))).exact == (i >= 3), i


async def test_an_answer_longer_than_max_tokens_is_not_served() -> None:
    cache, _, _ = new_cache()
    await cache.store(q("reset my password"), answer(output_tokens=50))
    assert not (await cache.check(q("reset my password", max_tokens=49))).hit
    assert not (await cache.check(q("reset my password please", max_tokens=49))).hit
    assert (await cache.check(q("reset my password", max_tokens=50))).hit


async def test_tool_calls_and_truncated_answers_are_not_stored() -> None:
    cache, _, embedder = new_cache()
    tool = await cache.store(q("weather in paris"), answer(has_tool_use=True))
    assert not tool.stored and "tool call" in tool.skip_reason
    cut = await cache.store(q("weather in paris"), answer(stop_reason="max_tokens"))
    assert not cut.stored and "end_turn" in cut.skip_reason
    assert len(cache) == 0 and embedder.calls == 0


async def test_entries_of_another_embedder_version_are_never_served() -> None:
    cache, _, embedder = new_cache()
    await cache.store(q("reset my password"), answer())
    embedder.version = "fake@2"
    assert not (await cache.check(q("reset my password"))).hit
    assert not (await cache.check(q("reset my password please"))).hit


async def test_a_store_of_the_same_query_replaces_the_entry() -> None:
    cache, clock, _ = new_cache()
    first = await cache.store(q("reset my password"), answer(b"old"))
    clock.advance(s=TTL_S - 1)
    refresh = q("  reset my password ", mode=pb.SEMANTIC_MODE_REFRESH)
    assert not (await cache.check(refresh)).hit  # REFRESH skips the read ...
    second = await cache.store(refresh, answer(b"new"))  # ... and stores over the old
    assert second.stored and second.entry_id != first.entry_id
    assert len(cache) == 1
    clock.advance(s=2)  # the old one would have expired by now; the new one is fresh
    result = await cache.check(q("reset my password"))
    assert result.entry is not None
    assert result.entry.answer.payload == b"new" and result.entry.entry_id == second.entry_id


async def test_concurrent_stores_are_all_visible_and_never_duplicate() -> None:
    cache, _, _ = new_cache()
    questions = [f"question number {i}" for i in range(5)]
    await asyncio.gather(*(cache.store(q(text), answer()) for text in questions * 2))
    assert len(cache) == 5
    results = await asyncio.gather(*(cache.check(q(text)) for text in questions))
    assert all(r.hit and r.exact for r in results)


async def test_drop_removes_one_tenant_only() -> None:
    cache, _, _ = new_cache()
    for tenant in ("a", "b"):
        await cache.store(q("reset my password", tenant=tenant), answer())
        await cache.store(q("reset my password", tenant=tenant, namespace="docs"), answer())
        await cache.store(q("opening hours", tenant=tenant, namespace="docs"), answer())
    assert await cache.drop("a", "docs") == 2
    assert (await cache.check(q("reset my password", tenant="a"))).hit
    assert not (await cache.check(q("opening hours", tenant="a", namespace="docs"))).hit
    assert await cache.drop("a") == 1
    assert await cache.drop("a") == 0
    assert len(cache) == 3
    assert (await cache.check(q("opening hours", tenant="b", namespace="docs"))).hit
    assert await cache.drop("nobody") == 0


async def test_a_miss_then_its_store_embed_the_question_once() -> None:
    cache, _, embedder = new_cache()
    await cache.store(q("How do I reset my password?"), answer())
    calls = embedder.calls
    assert not (await cache.check(q("What is the capital of France?"))).hit
    assert embedder.calls == calls + 1
    await cache.store(q("What is the capital of France?"), answer())
    assert embedder.calls == calls + 1  # the Lookup's vector, not a second embedding


async def test_another_tenants_question_is_embedded_again() -> None:
    """The recent vectors are by tenant: tenant b's Lookup is not made faster (no embedding) by
    tenant a having just asked the same text, which would tell b what a asked."""
    cache, _, embedder = new_cache()
    await cache.store(q("How do I reset my password?"), answer())
    await cache.store(q("How do I reset my password?", tenant="b"), answer())
    calls = embedder.calls
    assert not (await cache.check(q("What is the capital of France?"))).hit
    assert not (await cache.check(q("What is the capital of France?", tenant="b"))).hit
    assert embedder.calls == calls + 2


async def test_another_tenants_flood_of_questions_does_not_cost_this_one_an_embedding() -> None:
    """The recent vectors are bounded for all tenants together, and shared fairly: tenant a
    asking 2,000 distinct questions between b's Lookup and its Store pushes out a's own
    vectors, not b's, so b's Store reuses its Lookup's vector."""
    cache, _, embedder = new_cache()
    await cache.store(q("How do I reset my password?"), answer())
    await cache.store(q("How do I reset my password?", tenant="b"), answer())
    assert not (await cache.check(q("What is the capital of France?", tenant="b"))).hit
    for i in range(2000):
        assert not (await cache.check(q(f"flood question number {i}"))).hit
    calls = embedder.calls
    await cache.store(q("What is the capital of France?", tenant="b"), answer())
    assert embedder.calls == calls  # b's Lookup's vector, not a second embedding
    await cache.store(q("flood question number 0"), answer())
    assert embedder.calls == calls + 1  # a's oldest went: a's flood paid for itself


async def test_a_long_question_is_embedded_once_and_its_text_never_held() -> None:
    """The recent vectors are keyed by their texts, a long one by its hash (it would pin its
    text): its second lookup (``auto``'s embedding, a pending lookup) reuses the vector."""
    cache, _, embedder = new_cache()
    long = "Why is the sky blue? " * 1000  # 21 kB
    await cache.store(q("How do I reset my password?"), answer())
    calls = embedder.calls
    assert not (await cache.check(q(long))).hit
    assert not (await cache.check(q(long))).hit
    assert embedder.calls == calls + 1
    assert all(len(text) <= 16 * 1024 for _, text in cache._recent._values)


async def test_a_question_that_is_never_stored_takes_no_lease() -> None:
    """Nobody would be served by waiting for its leader's Store: an identical request calls
    the model at once instead of waiting out the first one's call."""
    clock = ManualClock()
    cache = SemanticCache(FakeEmbedder(), clock, threshold=0.8, leases=Leases(clock, 30.0))
    await cache.store(q("How do I reset my password?"), answer())
    long = "Why is the sky blue? " * 1000
    first = await cache.check(q(long), wait_s=5.0)
    assert not first.leader
    second = await asyncio.wait_for(cache.check(q(long), wait_s=5.0), 1.0)
    assert not second.pending and not second.hit


def _with_id(question: str, request_id: str, tenant: str = "a") -> Query:
    request = make_request(question)
    request.request_id = request_id
    return query_from_request(tenant, request)


async def test_an_answer_looked_up_before_a_purge_is_not_stored_after_it() -> None:
    """Lookup misses, the tenant invalidates its cache (say, a policy changed), then the
    leader's Store arrives with the answer made before: it must not come back."""
    cache, _, _ = new_cache()
    await cache.store(q("What is the refund window?"), answer())  # the scope exists
    asked = _with_id("How long do refunds take?", "req-1")
    assert not (await cache.check(asked)).hit
    await cache.drop("a")
    stored = await cache.store(asked, answer())
    assert not stored.stored and "after this request's lookup" in stored.skip_reason
    assert not (await cache.check(q("How long do refunds take?"))).hit
    # another tenant's purge changes nothing for this one; a lookup after the purge stores
    other = _with_id("How long do refunds take?", "req-2")
    assert not (await cache.check(other)).hit
    await cache.drop("b")
    assert (await cache.store(other, answer())).stored


async def test_a_lookup_pushed_out_of_the_record_does_not_undo_a_purge() -> None:
    """The record of a lookup is one of the last 4,096 misses: once the tenant's own later
    misses push it out, a Store of an answer looked up before the purge must still be refused
    (not taken as a Store with nothing known against it)."""
    cache, clock, _ = new_cache()
    await cache.store(q("What is the refund window?"), answer())
    asked = _with_id("How long do refunds take?", "req-1")
    assert not (await cache.check(asked)).hit  # the model call starts
    for i in range(_MISSES_KEPT):  # the tenant's ordinary misses meanwhile
        await cache.check(_with_id("hello there", f"n{i}"))
    await cache.drop("a")  # the refund policy changed
    stored = await cache.store(asked, answer())
    assert not stored.stored and "after this request's lookup" in stored.skip_reason
    # a Store with no lookup on record, long after the purge, is stored again
    clock.advance(ms=PURGE_GUARD_MS + 1)
    assert (await cache.store(_with_id("How long do refunds take?", "req-9"), answer())).stored


async def test_a_question_over_the_stored_length_is_not_stored() -> None:
    cache, _, _ = new_cache()
    long = "Why is the sky blue? " * 1000  # 21k characters
    stored = await cache.store(q(long), answer())
    assert not stored.stored and "longer than 16,384 characters" in stored.skip_reason
    assert len(cache) == 0


async def test_an_answer_over_the_stored_size_is_not_stored() -> None:
    """Its log record would be over the log's limit (it holds the answer in base64)."""
    cache, _, embedder = new_cache()
    big = await cache.store(q("summarise the whole log"), answer(b"z" * (8 * 1024 * 1024 + 1)))
    assert not big.stored and "larger than 8 MiB" in big.skip_reason
    assert len(cache) == 0 and embedder.calls == 0
    assert (await cache.store(q("summarise the whole log"), answer(b"z" * 8 * 1024 * 1024))).stored


async def test_a_question_about_the_present_is_neither_stored_nor_looked_up() -> None:
    """'What's today's date?' was stored and served for the whole TTL (24 h by default)."""
    clock, embedder = ManualClock(), FakeEmbedder()
    cache = SemanticCache(embedder, clock, threshold=0.8, leases=Leases(clock, 30.0))
    for question in [
        "What's today's date?",
        "What time is it now?",
        "What day of the week is it today?",
        "What is the latest version of Node.js?",
        "Any events in Paris this week?",
        "Will it rain tomorrow?",
    ]:
        stored = await cache.store(q(question), answer())
        assert not stored.stored and "present" in stored.skip_reason, question
    assert len(cache) == 0
    await cache.store(q("What is the date?"), answer())  # no word of the present: stored
    calls = embedder.calls
    result = await cache.check(q("What is the date today?"))
    assert not result.hit and "present" in result.skip_reason
    assert embedder.calls == calls and not result.leader  # not read: no embedding, no lease
    assert (await cache.check(q("How do I reset my password?"))).leader  # a miss that may be stored


async def test_a_word_of_the_present_in_a_pasted_document_does_not_stop_the_store() -> None:
    cache, _, _ = new_cache()
    assert (await cache.store(q("Now move it to May 17."), answer())).stored  # "Now, ...": no
    document = "The current API returns JSON.\nIt is now at version 2.\n \nSummarise this."
    assert (await cache.store(q(document), answer())).stored
    assert (await cache.check(q(document))).exact
    assert (await cache.store(q("How do I reset my password?"), answer())).stored
    assert (await cache.check(q("How do I reset my password?"))).exact


def test_a_question_of_many_sentences_opening_with_now_is_read_in_one_pass() -> None:
    """present_time copied the question up to every sentence-opening "Now" it passed over:
    one tenant's "Now. " x 200,000 (1 MB) held semantic-cache's event loop ~9 s, at Lookup and
    again at Store, every tenant's lookups waiting."""
    many = "Now. " * 400_000  # 2 MB
    with within(5.0):  # minutes when quadratic
        assert present_time(many) == ""
        assert present_time(many + "(Now) what is the date now?") == "now"
    for opening in ["Now", "  Now", "Done. Now", "Done!\t 'Now", "Yes: (Now", 'Done.\n  "Now']:
        assert present_time(opening + " move it to May 17.") == "", opening
    for inside in ["Do it now", "Done, now", "Do it (now", "Done. It is now"]:
        assert present_time(inside + " please.") == "now", inside


async def test_another_tenants_misses_do_not_push_out_a_lookup_made_before_a_purge() -> None:
    """The last 4,096 misses were kept for every tenant at once: tenant b's misses pushed out
    the record of a's lookup made before a's purge, and a Store of that lookup's answer
    arriving past the purge guard (a model call longer than 15 minutes: ROUTER_MODEL_TIMEOUT_S
    has no ceiling) put the answer from before the purge back. Over the bound, the tenant
    holding the most records loses its oldest: b's flood pushes out b's own."""
    cache, clock, _ = new_cache()
    await cache.store(q("What is the refund window?"), answer())
    asked = _with_id("How long do refunds take?", "req-1")
    assert not (await cache.check(asked)).hit  # the model call starts
    await cache.drop("a")  # the refund policy changed
    for i in range(2 * _MISSES_KEPT):  # another tenant's misses meanwhile
        await cache.check(_with_id("hello there", f"n{i}", tenant="b"))
    clock.advance(ms=PURGE_GUARD_MS + 1)  # the long model call ends
    stored = await cache.store(asked, answer())
    assert not stored.stored and "after this request's lookup" in stored.skip_reason
    assert not (await cache.check(q("How long do refunds take?"))).hit


async def test_another_tenants_misses_do_not_refuse_a_store_looked_up_after_a_purge() -> None:
    """The other way round: a's lookup made after its purge (a REFRESH, say) pushed out by
    b's misses was refused as a Store with nothing known, for 15 minutes after the purge."""
    cache, _, _ = new_cache()
    await cache.store(q("What is the refund window?"), answer())
    await cache.drop("a")
    asked = _with_id("How long do refunds take?", "req-2")
    assert not (await cache.check(asked)).hit
    for i in range(2 * _MISSES_KEPT):
        await cache.check(_with_id("hello there", f"n{i}", tenant="b"))
    assert (await cache.store(asked, answer())).stored
    assert (await cache.check(q("How long do refunds take?"))).hit
