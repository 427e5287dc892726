"""A Lookup that names the answer tiers its request accepts (``accepted_tiers``: an ``auto``
retry forced to the large tier) is refused a hit of another tier inside the check, so it is a
miss in every respect: its lease wait did not serve it, and it leads the model call."""

from __future__ import annotations

import asyncio

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import semantic_cache_pb2 as sc
from services.common.clock import ManualClock
from services.common.metrics import TenantLabels, new_registry
from services.semantic_cache.api import SemanticCacheApi
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.leases import Leases
from services.semantic_cache.metrics import SemanticCacheMetrics
from tests.unit.semantic_cache_support import FakeEmbedder, make_request
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
