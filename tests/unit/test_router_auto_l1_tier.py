"""An ``auto`` request whose own ``routing.threshold`` forces the large tier is not served the
small tier's cached answer, and L1 counts that lookup as the miss it was: the whole request
path in one process (the estimator's OfflineStack: the real semantic cache and router
pipeline, simulated replicas)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cachemesh.loadtest.workloads.base import TENANT_A, user
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import semantic_cache_pb2 as sc
from services.common.clock import ManualClock
from services.common.metrics import TenantLabels, new_registry
from services.semantic_cache.metrics import SemanticCacheMetrics
from services.tools.estimator.offline import OfflineStack
from services.tools.stack.lifecycle import Stack
from tests.unit.semantic_cache_support import FakeEmbedder
from tests.unit.test_service_metrics import value

ROOT = Path(__file__).resolve().parents[2]
QUESTION = "What is the capital of France?"


def _ask(
    request_id: str, threshold: float | None = None, *, text: str = QUESTION
) -> pb.CompleteRequest:
    request = pb.CompleteRequest(
        model="auto", max_tokens=200, messages=[user(text)], request_id=request_id
    )
    if threshold is not None:
        request.routing.threshold = threshold
    return request


async def _served(stack: OfflineStack, request: pb.CompleteRequest) -> tuple[str, str]:
    outcome = await stack.complete(TENANT_A, request)
    assert outcome.response is not None, outcome.code
    return outcome.response.tier, pb.Layer.Name(outcome.response.served_by)


def test_a_retry_forced_to_the_large_tier_is_answered_by_it_then_cached() -> None:
    registry = new_registry()
    stack = OfflineStack(
        Stack(ROOT, environ={}).settings(),
        ManualClock(),
        embedder=FakeEmbedder(),
        semantic_metrics=SemanticCacheMetrics(registry, TenantLabels(4)),
    )

    async def run() -> list[tuple[str, str]]:
        return [
            await _served(stack, _ask("plain")),  # a short question: the small tier
            await _served(stack, _ask("forced", -1.0)),  # "on the large model, please"
            await _served(stack, _ask("forced-again", -1.0)),
            await _served(stack, _ask("plain-again")),  # the large answer replaced the small
        ]

    assert asyncio.run(run()) == [
        ("small", "LAYER_MODEL"),
        ("large", "LAYER_MODEL"),
        ("large", "LAYER_SEMANTIC_CACHE"),
        ("large", "LAYER_SEMANTIC_CACHE"),
    ]
    # L1 served two of the four lookups: the small answer it found for the forced retry was
    # not served, and is a miss in its statistics and metrics, its refusal counted
    (stats,) = stack.semantic_api.stats(sc.L1StatsRequest(tenant=TENANT_A)).tenants
    assert (stats.lookups, stats.hits, stats.exact_hits) == (4, 2, 2)
    lookups = "cachemesh_semantic_cache_lookups_total"
    assert value(registry, lookups, tenant=TENANT_A, result="miss") == 2
    assert value(registry, lookups, tenant=TENANT_A, result="exact") == 2
    hits = "cachemesh_semantic_cache_hits_total"
    assert value(registry, hits, tenant=TENANT_A, kind="exact") == 2
    assert value(registry, "cachemesh_semantic_cache_refusals_total", reason="tier") == 1


@pytest.mark.parametrize("change", ["drop", "policy"])
def test_after_a_purge_the_forced_retrys_answer_still_replaces_the_small_one(change: str) -> None:
    """A tenant's purge (Drop), or L1 turned off, stops the Stores of lookups that missed
    before it, and for 15 minutes refuses a Store whose lookup L1 holds no miss for. The
    forced retry's refused hit is such a miss like any other: its Store is kept."""
    stack = OfflineStack(Stack(ROOT, environ={}).settings(), ManualClock(), embedder=FakeEmbedder())

    async def run() -> list[tuple[str, str]]:
        if change == "drop":  # the tenant's admin purged its L1 a moment ago
            await stack.semantic_api.drop(sc.DropRequest(tenant=TENANT_A))
        else:  # L1 turned off then on again (which stops the Stores on their way)
            for on in (False, True):
                await stack.semantic_api.set_policy(
                    sc.SetL1PolicyRequest(tenant=TENANT_A, l1_enabled=on)
                )
        return [
            await _served(stack, _ask("plain")),
            await _served(stack, _ask("forced", -1.0)),
            await _served(stack, _ask("forced-again", -1.0)),
            await _served(stack, _ask("plain-again")),
        ]

    assert asyncio.run(run()) == [
        ("small", "LAYER_MODEL"),
        ("large", "LAYER_MODEL"),
        ("large", "LAYER_SEMANTIC_CACHE"),  # not the large model paid again
        ("large", "LAYER_SEMANTIC_CACHE"),  # not the small answer again
    ]


def test_a_forced_retry_is_served_a_paraphrases_answer_of_the_tier_it_accepts() -> None:
    """The small tier answered the question, the large one a paraphrase of it (a retry forced
    to it): a retry of the question forced to the large tier is served that answer from L1,
    not the large model paid again, and the small entry stays for plain requests. The real
    embedder and the shipped verifier judge the paraphrase."""
    stack = OfflineStack(Stack(ROOT, environ={}).settings(), ManualClock())
    question, paraphrase = (
        "How do I reset my password?",
        "I forgot my password, how can I change it?",
    )

    async def run() -> list[tuple[str, str]]:
        return [
            await _served(stack, _ask("plain", text=question)),
            await _served(stack, _ask("forced-paraphrase", -1.0, text=paraphrase)),
            await _served(stack, _ask("forced", -1.0, text=question)),
            await _served(stack, _ask("plain-again", text=question)),
        ]

    assert asyncio.run(run()) == [
        ("small", "LAYER_MODEL"),
        ("large", "LAYER_MODEL"),
        ("large", "LAYER_SEMANTIC_CACHE"),  # the paraphrase's, not the large model paid again
        ("small", "LAYER_SEMANTIC_CACHE"),
    ]
