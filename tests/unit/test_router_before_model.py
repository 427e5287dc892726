"""The pipeline's ``before_model`` (the servicer's claim on an unmarked request_id in the
answer ledger) and ``retried`` (L1's take-over of a lease) against the fakes of
test_router_pipeline: awaited only once L1 did not answer, its answer served in place of a
model call, the L1 lease of a leading Lookup released (no Store: another call stored it)."""

from __future__ import annotations

import pytest

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import semantic_cache_pb2 as sc
from services.router.pipeline import chunks_of
from tests.unit.test_router_pipeline import Rig, _request


class Hook:
    """Counts its awaits; returns ``answer`` (None: the model is called)."""

    def __init__(self, answer: pb.CompleteResponse | None = None) -> None:
        self.answer = answer
        self.awaited = 0

    async def __call__(self) -> pb.CompleteResponse | None:
        self.awaited += 1
        return self.answer


async def _run(rig: Rig, hook: Hook, retried: bool = False) -> list[pb.CompleteChunk]:
    pipeline = rig.pipeline()
    run = pipeline.run("tenant-a", _request(), retried=retried, before_model=hook)
    chunks = [chunk async for chunk in run]
    await pipeline.drain()
    return chunks


@pytest.mark.parametrize("retried", [False, True])
async def test_an_l1_hit_never_awaits_it_and_the_lookup_says_whether_it_is_a_retry(
    retried: bool,
) -> None:
    rig = Rig()
    cached = sc.CachedAnswer(content=[pb.ContentBlock(text="Use the link.")], model="sim-large")
    rig.semantic.reply = sc.LookupResponse(hit=True, answer=cached)
    hook = Hook()
    chunks = await _run(rig, hook, retried)
    assert chunks[-1].end.served_by == pb.LAYER_SEMANTIC_CACHE and hook.awaited == 0
    assert [lookup.retry for lookup in rig.semantic.lookups] == [retried]


async def test_its_answer_is_served_instead_of_a_model_call_and_the_lease_released() -> None:
    rig = Rig()
    rig.semantic.reply = sc.LookupResponse(leader=True, lease_id="lease-1")
    replayed = pb.CompleteResponse(served_by=pb.LAYER_MODEL, model="sim-large", replayed=True)
    replayed.content.add(text="The first call's answer.")
    hook = Hook(replayed)
    chunks = await _run(rig, hook)
    assert hook.awaited == 1 and chunks == chunks_of(replayed)
    assert not rig.prefix.plans and not rig.models.calls and not rig.semantic.stores
    assert [release.lease_id for release in rig.semantic.releases] == ["lease-1"]


async def test_without_an_answer_the_model_is_called_as_before() -> None:
    rig = Rig()
    rig.semantic.reply = sc.LookupResponse(leader=True, lease_id="lease-1")
    hook = Hook()
    chunks = await _run(rig, hook)
    assert hook.awaited == 1 and chunks[-1].end.served_by == pb.LAYER_MODEL
    assert len(rig.models.calls) == 1 and len(rig.semantic.stores) == 1
