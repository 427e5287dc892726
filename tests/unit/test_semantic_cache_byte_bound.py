"""L1's byte bound (``SEMANTIC_CACHE_MAX_BYTES``): what the entries hold together, shared
between tenants by the same max-min rule as the entry count, in bytes."""

from __future__ import annotations

from typing import Any

import pytest

from services.common.clock import ManualClock
from services.common.env import ConfigError, Env
from services.semantic_cache.ann import remove_ids
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.operating_point import OperatingPoint
from services.semantic_cache.query import Query, query_from_request
from services.semantic_cache.recency import Recency
from services.semantic_cache.records import Answer
from services.semantic_cache.settings import DEFAULT_MAX_BYTES, SemanticCacheSettings
from services.semantic_cache.stats import SCOPE_BYTES, entry_bytes, held_bytes
from services.semantic_cache.verifier import Verifier, VerifierWeights
from services.semantic_cache.wiring import build_cache
from tests.unit.semantic_cache_support import FakeEmbedder, make_request

DIM = 64
KB = 1024


def q(question: str, tenant: str = "a") -> Query:
    return query_from_request(tenant, make_request(question))


def answer(size: int) -> Answer:
    return Answer(b"x" * size, "end_turn", 40, False)


def new_cache(max_bytes: int, max_entries: int = 1000) -> SemanticCache:
    return SemanticCache(
        FakeEmbedder(DIM),
        ManualClock(),
        threshold=0.8,
        max_entries=max_entries,
        max_bytes=max_bytes,
    )


def held(question: str, size: int, tenant: str = "a") -> int:
    return held_bytes(b"x" * size, q(question, tenant).normalised, DIM)


async def test_one_tenants_large_answers_evict_its_own_entries_not_another_tenants() -> None:
    """b keeps a few small FAQ answers; a stores 100 answers of 64 kB into a 1 MB L1: it ends
    holding what is left of the bound, b loses nothing, and the bound holds after every Store
    (bounded by entries alone, a held all 100: 6.4 MB)."""
    cache = new_cache(max_bytes=1_000_000)
    faq = ["how do i reset my password", "what is the refund policy", "where is my invoice"]
    for question in faq:
        assert (await cache.store(q(question, tenant="b"), answer(200))).stored
    for i in range(100):
        assert (await cache.store(q(f"report {i} on planet x{i}"), answer(64 * KB))).stored
        assert cache.stats.held_bytes <= 1_000_000
    assert cache.stats.entries["b"] == 3
    kept = cache.stats.entries["a"]
    assert kept == (1_000_000 - cache.stats.bytes["b"]) // held("report 99 on planet x99", 64 * KB)
    for question in faq:
        assert (await cache.check(q(question, tenant="b"))).exact
    for i in range(100):  # a's most recent are the ones left
        hit = (await cache.check(q(f"report {i} on planet x{i}"))).exact
        assert hit == (i >= 100 - kept), i
    assert cache.stats.evictions == 100 - kept
    assert cache.stats.held_bytes == sum(cache.stats.bytes.values())


async def test_over_the_bound_the_tenant_holding_the_most_bytes_loses_its_lru_entry() -> None:
    """b holds fewer entries but more bytes than a: a new entry of a's evicts b's least
    recently used one (by entries alone, a's own would have gone)."""
    size_b = 300 * KB
    cache = new_cache(max_bytes=1_000_000)
    for i in range(3):
        stored = await cache.store(q(f"b question {i} about x{i}", tenant="b"), answer(size_b))
        assert stored.stored
    assert (await cache.check(q("b question 0 about x0", tenant="b"))).exact  # now b's newest
    for i in range(5):
        assert (await cache.store(q(f"a question {i} about y{i}"), answer(20 * KB))).stored
    assert cache.stats.entries == {"a": 5, "b": 2}
    assert not (await cache.check(q("b question 1 about x1", tenant="b"))).hit
    assert (await cache.check(q("b question 0 about x0", tenant="b"))).exact


async def test_an_answer_alone_over_the_bound_is_not_stored_and_evicts_nothing() -> None:
    cache = new_cache(max_bytes=100 * KB)
    assert (await cache.store(q("a small one"), answer(KB))).stored
    too_large = await cache.store(q("a huge one"), answer(100 * KB))
    assert not too_large.stored
    assert "SEMANTIC_CACHE_MAX_BYTES" in too_large.skip_reason
    assert cache.stats.entries == {"a": 1}
    assert (await cache.check(q("a small one"))).exact
    assert not (await cache.check(q("a huge one"))).hit


async def test_a_restore_into_a_smaller_byte_bound_evicts_by_bytes() -> None:
    cache = new_cache(max_bytes=10_000_000)
    for i in range(10):
        assert (await cache.store(q(f"question {i} about z{i}"), answer(100 * KB))).stored
    smaller = new_cache(max_bytes=450_000)
    smaller.restore(cache.export_entries())
    assert smaller.stats.entries == {"a": 4}
    assert smaller.stats.held_bytes <= 450_000
    for i in range(10):  # the least recently used went first
        assert (await smaller.check(q(f"question {i} about z{i}"))).exact == (i >= 6), i


def test_recency_picks_the_largest_tenant_by_the_sizes_given() -> None:
    lru = Recency()
    lru.used("a", 1)
    lru.used("a", 2)
    lru.used("b", 3)
    assert lru.victim() == 1  # by entries: a holds two
    assert lru.victim({"a": 10, "b": 50}) == 3  # by bytes: b holds more


def settings(environ: dict[str, str]) -> SemanticCacheSettings:
    return SemanticCacheSettings.from_env(Env(environ), OperatingPoint(0.87, 0.3, 0.02))


def test_the_byte_bound_is_one_gib_by_default_and_read_from_its_variable() -> None:
    assert settings({}).max_bytes == DEFAULT_MAX_BYTES == 1 << 30
    assert settings({"SEMANTIC_CACHE_MAX_BYTES": "5000000"}).max_bytes == 5_000_000


@pytest.mark.parametrize("value", ["0", "-1", "1GB"])
def test_a_byte_bound_that_is_not_a_positive_number_stops_the_start(value: str) -> None:
    with pytest.raises(ConfigError, match="SEMANTIC_CACHE_MAX_BYTES"):
        settings({"SEMANTIC_CACHE_MAX_BYTES": value})


async def test_an_answer_over_its_tenants_share_is_refused_before_it_evicts_anything() -> None:
    """b holds 500 kB, a three small FAQ answers: a's 600 kB answer is over the level the bound
    leaves each (500 kB): refused, and a's FAQ stay (stored, it evicted a's FAQ, then itself,
    and said stored)."""
    cache = new_cache(max_bytes=1_000_000)
    for i in range(10):
        stored = await cache.store(q(f"b question {i} about x{i}", tenant="b"), answer(50 * KB))
        assert stored.stored
    faq = ["how do i reset my password", "what is the refund policy", "where is my invoice"]
    for question in faq:
        assert (await cache.store(q(question), answer(KB))).stored
    before = dict(cache.stats.entries)
    refused = await cache.store(q("the long report on planet x"), answer(600 * KB))
    assert not refused.stored
    assert "share of SEMANTIC_CACHE_MAX_BYTES" in refused.skip_reason
    assert cache.stats.entries == before
    assert cache.stats.evictions == 0
    for question in faq:
        assert (await cache.check(q(question))).exact


async def test_every_store_said_stored_is_served_under_the_byte_bound() -> None:
    """Stores of mixed sizes by three tenants into a small bound: whatever a Store says it
    stored is served at once, and the bound holds."""
    cache = new_cache(max_bytes=400_000)
    sizes = [1, 5, 20, 60, 150, 250, 390]
    for i in range(150):
        tenant = "abc"[i % 3]
        size = sizes[(i * 7 + i // 3) % len(sizes)] * KB
        query = q(f"question {i} about topic z{i}", tenant=tenant)
        result = await cache.store(query, answer(size))
        assert cache.stats.held_bytes <= 400_000
        if result.stored:
            assert (await cache.check(query)).exact, (i, tenant, size)
        else:
            assert "SEMANTIC_CACHE_MAX_BYTES" in result.skip_reason, result.skip_reason


async def test_a_new_answer_to_the_same_question_replaces_the_old_one_under_the_bound() -> None:
    cache = new_cache(max_bytes=700_000)
    assert (await cache.store(q("the yearly report"), answer(400 * KB))).stored
    assert (await cache.store(q("the yearly report"), answer(420 * KB))).stored
    assert cache.stats.entries == {"a": 1}


def wired(max_bytes: int, dim: int) -> SemanticCache:
    """The cache as the service builds it, once its embedder (of ``dim``) is loaded."""
    weights = VerifierWeights(
        ("cosine", "word_jaccard"), (), (0.0, 0.0), (1.0, 1.0), (0.0, 0.0), 5.0, {}
    )
    config = settings({"SEMANTIC_CACHE_MAX_BYTES": str(max_bytes)})
    return build_cache(config, FakeEmbedder(dim), ManualClock(), verifier=Verifier(weights, 0.5))


@pytest.mark.parametrize("dim", [64, 384])
async def test_a_byte_bound_too_small_for_one_entry_stops_the_start_naming_the_minimum(
    dim: int,
) -> None:
    """Every entry holds its vector (4 bytes a dimension: 1,536 for MiniLM's 384). A bound of
    1024 bytes started without complaint, then every Store was refused as larger than all of
    L1 may hold (and marked uncacheable): L1 stored nothing. The start stops now below room
    for one vector, an answer of 64 KiB and its scope's index (``SCOPE_BYTES``), naming the
    variable and the minimum."""
    minimum = 4 * dim + 64 * KB + SCOPE_BYTES
    for too_small in (1024, minimum - 1):
        with pytest.raises(ConfigError, match=f"SEMANTIC_CACHE_MAX_BYTES.* {minimum:,}"):
            wired(too_small, dim)
    cache = wired(minimum, dim)
    assert (await cache.store(q("how do i reset my password"), answer(60 * KB))).stored


async def test_one_large_answer_evicts_many_entries_with_one_index_call_a_scope(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One large answer at the bound evicts many small entries: removed one FAISS call at a
    time, an exact index compacted its whole array on each (1,182 evictions from a 19,000-entry
    scope held the event loop 3.3 s). Now one call a scope; the tenants' most recent entries
    are still served, the evicted ones not, and the index holds exactly the entries."""
    calls: list[int] = []

    def counted(index: Any, approximate: bool, vids: Any) -> None:
        calls.append(len(vids))
        remove_ids(index, approximate, vids)

    monkeypatch.setattr("services.semantic_cache.index.remove_ids", counted)
    small = [f"small question number {i}" for i in range(40)]
    bound = sum(held(question, 1 * KB) for question in small) + SCOPE_BYTES  # one scope
    cache = new_cache(max_bytes=bound)
    for question in small:
        assert (await cache.store(q(question), answer(1 * KB))).stored
    big = "one large report please"
    assert (await cache.store(q(big), answer(bound // 2))).stored
    evicted = cache.stats.evictions
    assert evicted > 10
    assert calls == [evicted]  # one call for the scope, not one per evicted entry
    assert cache.stats.held_bytes <= bound
    for i, question in enumerate(small):
        assert bool((await cache.check(q(question))).exact) == (i >= evicted), i
    assert (await cache.check(q(big))).exact
    (index,) = cache._scopes.values()
    assert index.faiss_index.ntotal == len(index.ids) == len(cache) == len(small) - evicted + 1


async def test_an_eviction_whose_index_removal_fails_leaves_each_entry_with_its_id(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Evictions take the victims out of the cache's maps, then out of their scopes' indexes
    in one call a scope (1e9a414 reversed the order of the former per-entry removal). A
    failing index removal left the victim's id in its index without its entry: every later
    lookup of its question raised KeyError, and every snapshot RuntimeError. Now the victims
    still indexed are put back (the cache stays over its bound until the next Store) and the
    Store's error is raised."""
    cache = new_cache(max_bytes=10**9, max_entries=2)
    questions = ["how do i rotate my api key", "where are my invoices", "what is my plan limit"]
    for question in questions[:2]:
        assert (await cache.store(q(question), answer(100))).stored

    def failing(*_: Any) -> None:
        raise RuntimeError("injected: remove_ids failed")

    monkeypatch.setattr("services.semantic_cache.index.remove_ids", failing)
    with pytest.raises(RuntimeError, match="injected"):
        await cache.store(q(questions[2]), answer(100))
    monkeypatch.setattr("services.semantic_cache.index.remove_ids", remove_ids)
    for question in questions:  # the victim is still paired with its id: served, no KeyError
        assert (await cache.check(q(question))).hit
    assert len(cache.export_entries().entries) == 3  # a snapshot reads them all
    assert (await cache.store(q("how do i export my data"), answer(100))).stored
    assert len(cache) == 2  # the next Store evicts down to the bound
    cache.export_entries()


def in_namespace(question: str, namespace: str, tenant: str = "a") -> Query:
    return query_from_request(tenant, make_request(question, namespace=namespace))


def accounted(cache: SemanticCache) -> int:
    """What the bound should count, read from what the cache holds: each entry's bytes, and
    each scope's index once."""
    return sum(entry_bytes(e, DIM) for e in cache._entries.values()) + SCOPE_BYTES * len(
        cache._scopes
    )


async def test_a_scope_is_charged_with_its_first_entry_and_released_with_its_last() -> None:
    """A scope's own index (~1.7 kB beside its entries' vectors) is counted once per scope:
    3 entries in one namespace and 2 in another are charged 2 scopes; removing one of the
    second's keeps its charge, removing its last releases it, and a purge releases the rest.
    Before, the bound counted no scope: 5 entries in 2 scopes were charged 0 for them."""
    cache = new_cache(max_bytes=DEFAULT_MAX_BYTES)
    ids = {}
    for namespace, count in (("n1", 3), ("n2", 2)):
        for i in range(count):
            question = f"question {i} of {namespace}"
            stored = await cache.store(in_namespace(question, namespace), answer(100))
            assert stored.stored
            ids[question] = stored.entry_id
    entries = sum(entry_bytes(e, DIM) for e in cache._entries.values())
    assert cache.stats.held_bytes == cache.stats.bytes["a"] == entries + 2 * SCOPE_BYTES
    assert await cache.drop_entry("a", ids["question 0 of n2"]) == 1
    assert cache.stats.held_bytes == accounted(cache)
    assert len(cache._scopes) == 2
    assert await cache.drop_entry("a", ids["question 1 of n2"]) == 1
    assert len(cache._scopes) == 1
    assert cache.stats.held_bytes == accounted(cache)
    entries = sum(entry_bytes(e, DIM) for e in cache._entries.values())
    assert cache.stats.held_bytes == entries + SCOPE_BYTES
    assert await cache.drop("a", "n1") == 3
    assert cache.stats.held_bytes == 0 and cache.stats.bytes == {}


async def test_a_namespace_per_answer_is_bounded_with_its_scopes_and_evicts_its_own() -> None:
    """A tenant storing each answer in its own namespace (one a conversation) opens a scope
    a Store: 100 one-entry scopes into a bound of 60 entries' bytes. The bound now holds with
    the scopes counted: a keeps what fits with a scope each (before: 60 entries, about twice
    the bytes the bound said once each scope's index is counted), b, holding less, keeps its
    3 entries of one scope, and what the stats count is what the cache holds."""
    one = held("conversation 99 asks about topic 99", 1 * KB)
    bound = 60 * one
    cache = new_cache(max_bytes=bound)
    faq = ["how do i reset my password", "what is the refund policy", "where is my invoice"]
    for question in faq:
        assert (await cache.store(in_namespace(question, "faq", tenant="b"), answer(200))).stored
    for i in range(100):
        question = f"conversation {i} asks about topic {i}"
        assert (await cache.store(in_namespace(question, f"conv-{i}"), answer(1 * KB))).stored
        assert cache.stats.held_bytes == accounted(cache)
        assert cache.stats.held_bytes <= bound
    assert cache.stats.entries["b"] == 3
    kept = cache.stats.entries["a"]
    assert kept == (bound - cache.stats.bytes["b"]) // (one + SCOPE_BYTES)
    assert cache.stats.evictions == 100 - kept
    assert len(cache._scopes) == kept + 1
    for i in range(100):  # a's most recent are the ones left
        question = f"conversation {i} asks about topic {i}"
        hit = (await cache.check(in_namespace(question, f"conv-{i}"))).exact
        assert hit == (i >= 100 - kept), i


async def test_a_scope_put_back_after_a_failed_eviction_is_charged_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The victim of a one-entry scope is forgotten (its scope's charge released) before its
    index removal; when that fails it is put back, and so is its scope's charge."""
    cache = new_cache(max_bytes=10**9, max_entries=1)
    assert (await cache.store(in_namespace("where are my invoices", "n1"), answer(100))).stored

    def failing(*_: Any) -> None:
        raise RuntimeError("injected: remove_ids failed")

    monkeypatch.setattr("services.semantic_cache.index.remove_ids", failing)
    with pytest.raises(RuntimeError, match="injected"):
        await cache.store(in_namespace("what is my plan limit", "n2"), answer(100))
    assert len(cache._scopes) == 2
    assert cache.stats.held_bytes == accounted(cache)
    monkeypatch.setattr("services.semantic_cache.index.remove_ids", remove_ids)
    assert (await cache.store(in_namespace("how do i export my data", "n3"), answer(100))).stored
    assert len(cache._scopes) == 1
    assert cache.stats.held_bytes == accounted(cache) == cache.stats.bytes["a"]


async def test_a_restore_charges_each_scope_once() -> None:
    source = new_cache(max_bytes=10**9)
    for i in range(6):
        question = f"question {i} about topic {i}"
        assert (await source.store(in_namespace(question, f"n{i % 3}"), answer(100))).stored
    restored = new_cache(max_bytes=10**9)
    restored.restore(source.export_entries())
    assert len(restored._scopes) == 3
    assert restored.stats.held_bytes == accounted(restored) == source.stats.held_bytes
