"""REFRESH (skip the read, store the new answer over the old) through the router and L1.

The router looks a REFRESH up like any request, so L1 records its miss with the tenant's
purge count: its Store then replaces the old entry even just after a purge of the tenant
(a Store with no lookup on record is refused for 15 minutes after one), while L1 still
serves it nothing and spends no embedding on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from cachemesh import build_request
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from cachemesh.v1 import semantic_cache_pb2 as sc
from services.common.clock import ManualClock
from services.semantic_cache.api import SemanticCacheApi
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.leases import Leases
from services.tools.estimator.local_adapters import LocalSemantic
from tests.unit.semantic_cache_support import FakeEmbedder
from tests.unit.test_router_pipeline import FakeModels, FakeSemantic, FakeStream, Rig

TENANT = "tenant-a"  # the Rig's


@dataclass
class Answers(FakeModels):
    """Every replica answers ``text``."""

    text: str = "Refunds take 30 days."

    def generate(
        self, replica: str, request: model_pb2.GenerateRequest, deadline_s: float
    ) -> FakeStream:
        self.calls.append((replica, request))
        start = model_pb2.GenerateStart(replica=replica, prompt_tokens=40)
        end = model_pb2.GenerateEnd(output_tokens=3, stop_reason="end_turn")
        return FakeStream(
            [
                model_pb2.GenerateChunk(start=start),
                model_pb2.GenerateChunk(text=self.text),
                model_pb2.GenerateChunk(end=end),
            ]
        )


def question(mode: pb.SemanticMode.ValueType, request_id: str) -> pb.CompleteRequest:
    request = build_request("How long do refunds take?", model="sim-large", request_id=request_id)
    request.cache.semantic = mode
    request.cache.namespace = "faq"
    return request


def l1() -> tuple[SemanticCacheApi, ManualClock, FakeEmbedder]:
    clock = ManualClock()
    embedder = FakeEmbedder()
    cache = SemanticCache(embedder, clock, threshold=0.8, leases=Leases(clock, 30.0))
    return SemanticCacheApi(cache, lease_wait_s=30.0), clock, embedder


async def test_refresh_replaces_the_answer_after_a_purge_of_another_namespace() -> None:
    api, clock, _ = l1()
    models = Answers()
    rig = Rig(semantic=LocalSemantic(api), models=models)  # type: ignore[arg-type]
    await rig.run(question(pb.SEMANTIC_MODE_USE, "r1"))  # stored: "30 days"
    await api.drop(sc.DropRequest(tenant=TENANT, namespace="news"))  # an unrelated purge
    clock.advance(s=60)  # a minute later the policy changes: the answer is refreshed
    models.text = "Refunds take 14 days."
    refreshed = (await rig.run(question(pb.SEMANTIC_MODE_REFRESH, "r2")))[-1].end
    assert refreshed.served_by == pb.LAYER_MODEL  # the REFRESH read nothing
    assert refreshed.content[0].text == "Refunds take 14 days."
    served = (await rig.run(question(pb.SEMANTIC_MODE_USE, "r3")))[-1].end
    assert served.served_by == pb.LAYER_SEMANTIC_CACHE
    assert served.content[0].text == "Refunds take 14 days."
    assert len(models.calls) == 2


async def test_a_refresh_lookup_serves_nothing_and_embeds_nothing() -> None:
    api, _, embedder = l1()
    rig = Rig(semantic=LocalSemantic(api), models=Answers())  # type: ignore[arg-type]
    await rig.run(question(pb.SEMANTIC_MODE_USE, "r1"))  # an entry to serve
    embedded = embedder.calls
    lookup = sc.LookupRequest(tenant=TENANT, request=question(pb.SEMANTIC_MODE_REFRESH, "r2"))
    reply = await api.lookup(lookup, 2.0)
    assert not reply.hit and not reply.leader and not reply.pending and reply.skip_reason
    assert not reply.embedding and embedder.calls == embedded


async def test_a_purge_after_a_refresh_lookup_still_refuses_its_store() -> None:
    """The answer of a REFRESH looked up before a purge predates the purge: not stored."""
    api, clock, _ = l1()
    refresh = question(pb.SEMANTIC_MODE_REFRESH, "r2")
    await api.lookup(sc.LookupRequest(tenant=TENANT, request=refresh), 2.0)
    await api.drop(sc.DropRequest(tenant=TENANT, namespace="news"))
    clock.advance(s=60)
    answer = sc.CachedAnswer(
        content=[pb.ContentBlock(text="old")], stop_reason="end_turn", output_tokens=1
    )
    stored = await api.store(sc.StoreRequest(tenant=TENANT, request=refresh, answer=answer))
    assert not stored.stored and "invalidated" in stored.skip_reason


@pytest.mark.parametrize(
    ("mode", "lookups"),
    [(pb.SEMANTIC_MODE_REFRESH, 1), (pb.SEMANTIC_MODE_BYPASS, 0), (pb.SEMANTIC_MODE_USE, 1)],
)
async def test_the_router_looks_up_a_refresh_but_never_a_bypass(
    mode: pb.SemanticMode.ValueType, lookups: int
) -> None:
    semantic = FakeSemantic()
    await Rig(semantic=semantic).run(question(mode, "r1"))
    assert len(semantic.lookups) == lookups
    assert not any(lookup.want_embedding for lookup in semantic.lookups)
