"""A Lookup that names the answer tiers its request accepts (``accepted_tiers``: an ``auto``
retry forced to the large tier) is refused a hit of another tier inside the check, so it is a
miss in every respect: its lease wait did not serve it, and it leads the model call."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import semantic_cache_pb2 as sc
from services.common.clock import ManualClock
from services.common.metrics import TenantLabels, new_registry
from services.semantic_cache.api import SemanticCacheApi
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.leases import Leases
from services.semantic_cache.metrics import SemanticCacheMetrics, refusal_reason
from services.semantic_cache.query import query_from_request
from services.semantic_cache.records import Answer
from tests.unit.semantic_cache_support import FakeEmbedder, Placed, make_request
from tests.unit.test_semantic_cache_reading import CONFIG, reading_verifier, shipped_cache
from tests.unit.test_service_metrics import value

SMALL = sc.CachedAnswer(
    content=[pb.ContentBlock(text="Paris.")],
    model="sim-small",
    tier="small",
    stop_reason="end_turn",
    output_tokens=3,
)
WAITS = "cachemesh_semantic_cache_lease_waits_total"


async def test_a_hit_refused_after_a_lease_wait_is_a_wait_that_served_nothing() -> None:
    registry = new_registry()
    metrics = SemanticCacheMetrics(registry, TenantLabels(4))
    clock = ManualClock()  # the lease's age limit never passes: the Store ends it
    cache = SemanticCache(
        FakeEmbedder(),
        clock,
        threshold=0.8,
        leases=Leases(clock, 30.0),
        on_lease_wait=metrics.lease_waited,
    )
    api = SemanticCacheApi(cache, lease_wait_s=30.0, metrics=metrics)
    request = make_request("What is the capital of France?")
    plain = await api.lookup(sc.LookupRequest(tenant="a", request=request), 20.0)
    assert plain.leader  # its model call is on: the forced retry waits for it
    forced = asyncio.ensure_future(
        api.lookup(sc.LookupRequest(tenant="a", request=request, accepted_tiers=["large"]), 20.0)
    )
    for _ in range(5):
        await asyncio.sleep(0)
    assert not forced.done()  # waiting on the plain request's lease
    await api.store(sc.StoreRequest(tenant="a", request=request, answer=SMALL))
    reply = await forced
    assert not reply.hit and reply.refusal.startswith("tier:")
    assert value(registry, WAITS, outcome="served") == 0
    assert value(registry, WAITS, outcome="not_served") == 1
    assert reply.leader and not reply.waited  # the model answers it, under its own lease
    assert value(registry, "cachemesh_semantic_cache_refusals_total", reason="tier") == 1
    (stats,) = api.stats(sc.L1StatsRequest(tenant="a")).tenants
    assert (stats.lookups, stats.hits) == (2, 0)


def _answer(tier: str, text: str) -> sc.CachedAnswer:
    return sc.CachedAnswer(
        content=[pb.ContentBlock(text=text)],
        model=f"sim-{tier}",
        tier=tier,
        stop_reason="end_turn",
        output_tokens=12,
    )


async def test_a_match_refused_for_its_tier_goes_on_to_a_paraphrase_of_an_accepted_one() -> None:
    """The question's exact entry is the small tier's, a paraphrase's the large tier's: a
    retry forced to the large tier is served the paraphrase's answer (a paid model call
    before), and that lookup is one paraphrase hit in Stats and the metrics, refused nothing.
    The real embedder and the shipped verifier decide the paraphrase, as for any lookup."""
    registry = new_registry()
    metrics = SemanticCacheMetrics(registry, TenantLabels(4))
    cache = shipped_cache(reading_verifier())
    api = SemanticCacheApi(cache, metrics=metrics)
    asked = make_request("How do I reset my password?")
    paraphrase = make_request("I forgot my password, how can I change it?")
    await api.store(sc.StoreRequest(tenant="a", request=asked, answer=_answer("small", "S")))
    large = _answer("large", "L")
    await api.store(sc.StoreRequest(tenant="a", request=paraphrase, answer=large))
    forced = sc.LookupRequest(tenant="a", request=asked, accepted_tiers=["large"])
    reply = await api.lookup(forced, 20.0)
    assert (reply.hit, reply.refusal) == (True, "")
    assert reply.answer == large and not reply.match.exact
    assert reply.match.similarity >= CONFIG.threshold
    (stats,) = api.stats(sc.L1StatsRequest(tenant="a")).tenants
    assert (stats.lookups, stats.hits, stats.exact_hits) == (1, 1, 0)
    lookups = "cachemesh_semantic_cache_lookups_total"
    assert value(registry, lookups, tenant="a", result="paraphrase") == 1
    assert value(registry, lookups, tenant="a", result="miss") == 0
    hits = "cachemesh_semantic_cache_hits_total"
    assert value(registry, hits, tenant="a", kind="paraphrase") == 1
    assert value(registry, "cachemesh_semantic_cache_refusals_total", reason="tier") == 0
    # a plain lookup still gets the exact entry, the small tier's
    plain = await api.lookup(sc.LookupRequest(tenant="a", request=asked), 20.0)
    assert plain.match.exact and plain.answer.tier == "small"


async def test_a_paraphrase_search_that_finds_only_other_tiers_is_a_tier_refusal() -> None:
    """Candidates of a tier the Lookup does not accept are passed over; a search left with
    none is a miss that says why (metric reason ``tier``)."""
    cache = SemanticCache(FakeEmbedder(), ManualClock(), threshold=0.8)
    small = Answer(SMALL.SerializeToString(), "end_turn", 3, False, True)
    await cache.store(query_from_request("a", make_request("reset my password")), small)
    asked = query_from_request("a", make_request("reset my password please"))
    assert (await cache.check(asked)).hit  # a paraphrase any tier is served
    forced = dataclasses.replace(asked, accepted_tiers=("large",))
    result = await cache.check(forced)
    assert not result.hit and result.best_similarity >= 0.8
    assert refusal_reason(result.refusal) == "tier", result.refusal


async def test_a_match_refused_for_its_tier_keeps_its_place_in_the_eviction_order() -> None:
    """Only a served hit makes an entry recently used: a stream of lookups refused the small
    answer (retries forced to the large tier) does not keep it alive at the expense of an
    entry that is served."""
    cache = SemanticCache(FakeEmbedder(), ManualClock(), threshold=0.8, max_entries=2)
    small = Answer(SMALL.SerializeToString(), "end_turn", 3, False, True)
    refused = query_from_request("a", make_request("What is the capital of France?"))
    served = query_from_request("a", make_request("How do I reset my password?"))
    await cache.store(refused, small)
    await cache.store(served, small)
    forced = dataclasses.replace(refused, accepted_tiers=("large",))
    for _ in range(3):
        assert not (await cache.check(forced)).hit
    await cache.store(query_from_request("a", make_request("Where is my invoice?")), small)
    assert (await cache.check(served)).exact  # the entry refused was the one evicted
    assert not (await cache.check(refused)).hit


_QUESTION, _NEAR, _OTHER = "how do i renew my passport", "how can i renew a passport", "renew visa"


def _stored(tier: str, text: str) -> Answer:
    return Answer(_answer(tier, text).SerializeToString(), "end_turn", 12, False, True)


async def _placed_cache(near: float, other: float) -> SemanticCache:
    """The question's paraphrase answered by the small tier at cosine ``near``, another
    question (another answer) by the large tier at ``other``; margin 0.03; no verifier (it
    accepts every candidate, as the shipped one may close paraphrases)."""
    cosines = {_QUESTION: (1.0, 1), _NEAR: (near, 1), _OTHER: (other, 2)}
    cache = SemanticCache(Placed(cosines), ManualClock(), threshold=0.9, margin=0.03)
    await cache.store(query_from_request("a", make_request(_NEAR)), _stored("small", "DS-82"))
    await cache.store(query_from_request("a", make_request(_OTHER)), _stored("large", "visa"))
    return cache


async def test_another_tiers_candidate_still_makes_a_forced_lookup_ambiguous() -> None:
    """Passing over another tier's entries must not turn the ambiguity rule off: the nearest
    candidate the small tier's (0.95), another answer the large tier's within the margin
    (0.94). A plain lookup is ambiguous; a lookup accepting only the large tier must not be
    served the runner-up's answer (another question's) either."""
    cache = await _placed_cache(0.95, 0.94)
    asked = query_from_request("a", make_request(_QUESTION))
    plain = await cache.check(asked)
    assert not plain.hit and plain.refusal.startswith("ambiguous")
    forced = await cache.check(dataclasses.replace(asked, accepted_tiers=("large",)))
    assert not forced.hit
    assert refusal_reason(forced.refusal) == "tier", forced.refusal  # its nearest: small's


async def test_a_forced_lookup_is_served_the_accepted_tiers_answer_when_it_is_the_nearest() -> None:
    """The same cache with the large tier's entry the nearest and alone within the margin:
    the forced lookup is served it (the rule refuses a runner-up, not the nearest)."""
    cache = await _placed_cache(0.91, 0.97)
    asked = query_from_request("a", make_request(_QUESTION))
    forced = await cache.check(dataclasses.replace(asked, accepted_tiers=("large",)))
    assert forced.entry is not None and not forced.exact
    assert sc.CachedAnswer.FromString(forced.entry.answer.payload).tier == "large"


async def test_a_paraphrase_refused_after_a_tier_refused_match_is_still_a_tier_refusal() -> None:
    """The question's exact entry is the small tier's; the nearest paraphrase (0.95) is the
    large tier's, and the verifier refuses it (the words swapped). A lookup forced to the large
    tier was reported as the verifier's refusal (metric reason ``verifier``, so the router saw
    no tier refusal), with a best similarity of 1.0 from the exact entry it passed over. The
    tier is why the exact answer was not served (the model's answer replaces it): the refusal
    says so first, then the paraphrase's, and ``best_similarity`` is the paraphrase search's."""
    from tests.unit.test_semantic_cache_verifier import lexical

    question, swapped = "does the dog bite the man", "does the man bite the dog"
    cosines = {question: (1.0, 1), swapped: (0.95, 1)}
    cache = SemanticCache(
        Placed(cosines), ManualClock(), threshold=0.9, margin=0.03, verifier=lexical()
    )
    asked = query_from_request("a", make_request(question))
    await cache.store(asked, _stored("small", "yes"))
    await cache.store(query_from_request("a", make_request(swapped)), _stored("large", "no"))
    registry = new_registry()
    metrics = SemanticCacheMetrics(registry, TenantLabels(4))
    result = await cache.check(dataclasses.replace(asked, accepted_tiers=("large",)))
    assert not result.hit
    assert refusal_reason(result.refusal) == "tier", result.refusal
    assert "small tier" in result.refusal and "verifier refused" in result.refusal
    assert result.best_similarity == pytest.approx(0.95, abs=1e-3)
    metrics.looked_up("a", result)
    assert value(registry, "cachemesh_semantic_cache_refusals_total", reason="tier") == 1
    assert value(registry, "cachemesh_semantic_cache_refusals_total", reason="verifier") == 0
