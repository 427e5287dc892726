"""The bench's cases: the miss cases (agent-shaped requests through every layer, each a sure
L1 miss), and the semantic-hit case (b), which holds only pairs the cache serves.

Issue 9: pairs were chosen by cosine alone, so the pool held pairs the verifier refuses (words
reordered, a negation or a number on one side). Each was a miss answered by the model, and
the identical asks after it waited on its lease: they were the case's p99 (~0.5 s against a
p50 of a few ms), a stall that was not on the hit path at all.
"""

from __future__ import annotations

import csv
from pathlib import Path

from cachemesh.loadtest.workloads.faq import PAIRS, faq_request
from services.common.clock import ManualClock
from services.common.models import load_model_table
from services.common.prompt import last_user_text
from services.router.validation import validate_request
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.cross_encoder import load_cross_encoder
from services.semantic_cache.operating_point import OperatingPoint
from services.semantic_cache.query import Query, query_from_request
from services.semantic_cache.verifier import Verifier, VerifierWeights
from services.tools.bench.gateway import cases
from services.tools.bench.gateway.cases import paraphrase_pairs, semantic_hits
from tests.public_data import data_dir
from tests.unit.semantic_cache_support import FakeEmbedder
from tests.unit.test_semantic_cache_rules import answer

TABLE = load_model_table()


def test_agent_misses_are_auto_tau_turns_ending_in_user_text_each_in_its_namespace() -> None:
    items = cases.agent_misses(data_dir(), "run-c", 40, seed=8)
    assert len(items) == 40
    for item in items:
        request = item.request
        validate_request(request, TABLE, set(TABLE.models))
        assert request.model == "auto" and len(request.tools) == 14 and request.system
        assert last_user_text(request)  # the router looks L1 up and stores the answer
    namespaces = [i.request.cache.namespace for i in items]
    assert namespaces == [f"run-c/{i}" for i in range(40)]
    assert any(len(i.request.messages) > 1 for i in items)  # conversations so far, not openers


def test_the_same_seed_gives_the_same_requests_on_both_tracing_stacks() -> None:
    one = cases.agent_misses(data_dir(), "ns", 10, seed=1)
    two = cases.agent_misses(data_dir(), "ns", 10, seed=1)
    assert [i.request for i in one] == [i.request for i in two]


def test_unrelated_misses_get_their_own_namespaces_too() -> None:
    items = cases.misses(data_dir(), "run-c2", 30, seed=1)
    assert [i.request.cache.namespace for i in items] == [f"run-c2/{i}" for i in range(30)]
    assert all(i.request.model == "auto" and not i.request.tools for i in items)


THRESHOLD = 0.8  # FakeEmbedder's cosines: the two paraphrases below are at 0.83 and 1.0
MIN_P = OperatingPoint.load().min_probability  # the shipped setting
SERVED = [
    ("How do I reset my password?", "How can I reset my password?"),
    ("How do I learn to cook rice well?", "How do I learn to cook good rice?"),
]
# Pairs labelled as duplicates in the file, at a high cosine, that the verifier refuses: the
# arguments of an asymmetric relation swapped, a negation on one side.
REFUSED = [
    ("How do I convert EUR to USD?", "How do I convert USD to EUR?"),
    ("Flights from Paris to London", "Flights from London to Paris"),
    ("Is it safe to take aspirin with ibuprofen?", "Is it safe to take aspirin without ibuprofen?"),
]


def _data_dir(tmp_path: Path) -> Path:
    path = tmp_path / PAIRS
    path.parent.mkdir(parents=True)
    with path.open("w", encoding="utf-8", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(["text_a", "text_b", "label"])
        out.writerow(["How do I bake bread?", "How do I fix a bike?", "0"])  # not a duplicate
        for a, b in [*REFUSED[:2], SERVED[0], REFUSED[2], SERVED[1]]:
            out.writerow([a, b, "1"])
    return tmp_path


def _verifier(min_p: float = MIN_P) -> Verifier:
    return Verifier(VerifierWeights.load(), min_p, load_cross_encoder())


def test_only_the_pairs_the_verifier_accepts_are_chosen(tmp_path: Path) -> None:
    chosen = paraphrase_pairs(_data_dir(tmp_path), FakeEmbedder(), THRESHOLD, _verifier(), 10)
    assert chosen == SERVED


def test_by_cosine_alone_the_refused_pairs_would_be_chosen(tmp_path: Path) -> None:
    """The check above has teeth: min probability 0 turns the verifier's score off, so the
    negation, refused by its score alone, is chosen; the swapped arguments are refused by the
    reader (``contrasts.swapped``) whatever the probability."""
    chosen = paraphrase_pairs(_data_dir(tmp_path), FakeEmbedder(), THRESHOLD, _verifier(0.0), 10)
    assert REFUSED[2] in chosen
    assert not set(REFUSED[:2]) & set(chosen)


async def test_every_ask_of_the_case_is_a_hit_of_a_cache_at_that_setting(tmp_path: Path) -> None:
    embedder, verifier = FakeEmbedder(), _verifier()
    pairs = paraphrase_pairs(_data_dir(tmp_path), embedder, THRESHOLD, verifier, 10)
    warm, plan = semantic_hits(pairs, "bench")
    assert len({i.question for i in plan}) == len(plan) == len(pairs)  # each asked once
    cache = SemanticCache(embedder, ManualClock(), threshold=THRESHOLD, verifier=verifier)
    for item in warm:
        stored = await cache.store(query_from_request(item.tenant, item.request), answer())
        assert stored.stored
    for item in plan:
        result = await cache.check(query_from_request(item.tenant, item.request))
        assert result.hit and not result.exact, item.question
    for a, b in REFUSED:  # while each refused pair is a miss, answered by the model
        assert (await cache.store(_query(a), answer())).stored
        assert not (await cache.check(_query(b))).hit


def _query(question: str) -> Query:
    return query_from_request("tenant-a", faq_request(question, "bench"))
