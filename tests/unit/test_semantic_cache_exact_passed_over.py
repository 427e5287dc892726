"""An exact match of a tier the Lookup does not accept (an ``auto`` retry forced to the large
tier) is passed over, not taken for a refused nearest candidate: the Lookup goes on to the
paraphrase search without it. What it may serve then is what the same cache without that
entry serves to the same Lookup (threshold, verification and margin as for any lookup; other
tiers' paraphrases keeping their places), never more: the entry passed over is the question
itself, and the rule that a refused nearest never promotes a runner-up stands for the
candidates of the search. A placed vector layout each, no verifier (it accepts every
candidate, the worst case for a near-miss), margin 0.03. In the layout of another question
within the margin of the exact match, both serve that question's answer (the verifier is the
only guard there, as in the cache without the entry); had the exact match stayed a
competitor, that Lookup would be ambiguous, and so would every forced Lookup with a
paraphrase of its question within the margin (the retry's hits lost)."""

from __future__ import annotations

import dataclasses

import pytest

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import semantic_cache_pb2 as sc
from services.common.clock import ManualClock
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.metrics import refusal_reason
from services.semantic_cache.query import Query, query_from_request
from services.semantic_cache.records import Answer, CheckResult
from tests.unit.semantic_cache_support import Placed, make_request

QUESTION = "how do i renew my passport"
LAYOUTS: dict[str, dict[str, tuple[float, int, str, str]]] = {
    # text -> (cosine to the question, axis: 1 the same question, 2 another), tier, answer
    "a paraphrase of the large tier": {"passport renewal steps": (0.95, 1, "large", "DS-82b")},
    "another question within the margin of the exact match": {
        "renew visa": (0.975, 2, "large", "visa")
    },
    "a paraphrase of the small tier nearest": {
        "how can i renew a passport": (0.99, 1, "small", "DS-82"),
        "renew visa": (0.97, 2, "large", "visa"),
    },
    "two answers of the large tier within the margin": {
        "passport renewal steps": (0.96, 1, "large", "DS-82b"),
        "renew visa": (0.94, 2, "large", "visa"),
    },
    "nothing at the threshold": {"renew visa": (0.85, 2, "large", "visa")},
}


def _answer(tier: str, text: str) -> Answer:
    cached = sc.CachedAnswer(
        content=[pb.ContentBlock(text=text)],
        model=f"sim-{tier}",
        tier=tier,
        stop_reason="end_turn",
        output_tokens=12,
    )
    return Answer(cached.SerializeToString(), "end_turn", 12, False, True)


def _forced(text: str) -> Query:
    query = query_from_request("a", make_request(text, model="auto"))
    return dataclasses.replace(query, accepted_tiers=("large",))


def _served(result: CheckResult) -> str | None:
    if result.entry is None:
        return None
    return sc.CachedAnswer.FromString(result.entry.answer.payload).content[0].text


async def _cache(layout: str, *, exact: bool) -> SemanticCache:
    placed = LAYOUTS[layout]
    cosines = {QUESTION: (1.0, 1)} | {t: (c, axis) for t, (c, axis, _, _) in placed.items()}
    cache = SemanticCache(Placed(cosines), ManualClock(), threshold=0.9, margin=0.03)
    if exact:  # the question itself, answered by the small tier
        await cache.store(_forced(QUESTION), _answer("small", "DS-82, small"))
    for text, (_, _, tier, answer) in placed.items():
        await cache.store(_forced(text), _answer(tier, answer))
    return cache


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
async def test_a_lookup_past_an_exact_match_of_another_tier_is_the_cache_without_it(
    layout: str,
) -> None:
    without = await (await _cache(layout, exact=False)).check(_forced(QUESTION))
    passed = await (await _cache(layout, exact=True)).check(_forced(QUESTION))
    assert _served(passed) == _served(without)
    assert not passed.exact
    assert passed.best_similarity == pytest.approx(without.best_similarity, abs=1e-6)
    if passed.entry is None:  # a miss says the tier first (the Store replaces the entry)
        assert refusal_reason(passed.refusal) == "tier", passed.refusal
        assert without.refusal in passed.refusal


def test_the_layouts_cover_a_hit_a_refused_nearest_an_ambiguity_and_nothing() -> None:
    """What the test above compares is worth comparing: each outcome occurs."""
    import asyncio

    async def outcomes() -> set[str]:
        found = set()
        for layout in LAYOUTS:
            result = await (await _cache(layout, exact=False)).check(_forced(QUESTION))
            if result.entry is not None:
                found.add("hit")
            else:
                found.add(refusal_reason(result.refusal) if result.refusal else "none")
        return found

    assert asyncio.run(outcomes()) == {"hit", "tier", "ambiguous", "none"}
