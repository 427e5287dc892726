"""A self-hosted replica's engine restarted (a deploy, an OOM kill: its KV cache gone): the
first WARM from its new run (``CommitRequest.replica_instance``, the engine's
``GenerateStart.engine_instance``) forgets prefix-cache's whole view of the replica, every
tenant's blocks, before its own read is judged; counted (``cause="restart"``). Unset (an older
router or replica): the view is kept, as before."""

from __future__ import annotations

import pytest

from cachemesh.v1 import gateway_pb2 as pb
from services.common.tokens import Tokenizer, load_cl100k
from tests.unit.test_prefix_cache_view_reports import AGENT, FAQ, MODEL, Rig, _ask

CORRECTIONS = "cachemesh_prefix_cache_view_corrections_total"
RESTART = {"model": MODEL, "cause": "restart"}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_cl100k()


async def _warm(rig: Rig, rid: str, request: pb.CompleteRequest, run: str, tenant: str) -> int:
    split = await rig.core.warm(
        tenant, rid, MODEL, request, "a", kv_cached_unreported=True, replica_instance=run
    )
    return split.read_tokens


async def _held(rig: Rig, tenant: str, request: pb.CompleteRequest) -> int:
    plan = await rig.core.plan(tenant, MODEL, request, ["a"])
    return plan.candidates[0].warm_prefix_tokens


async def test_a_new_engine_run_forgets_every_tenants_blocks_on_the_replica(
    tokenizer: Tokenizer,
) -> None:
    rig = Rig(tokenizer)
    one, two = _ask(AGENT, "Where is order 7?"), _ask(FAQ, "When do you open?")
    assert await _warm(rig, "1", one, "run-1", "t") == 0
    assert await _warm(rig, "2", two, "run-1", "u") == 0
    assert await _held(rig, "t", one) > 0 and await _held(rig, "u", two) > 0
    assert await _warm(rig, "3", one, "run-1", "t") > 0  # the same run: read as warm

    # the engine restarted: the next WARM on it comes from a new run, and reads nothing
    assert await _warm(rig, "4", one, "run-2", "t") == 0
    assert rig.registry.get_sample_value(CORRECTIONS, RESTART) == 1
    # the other tenant's conversation is no longer predicted there (no stall to find it)
    assert await _held(rig, "u", two) == 0
    # what the new run prefilled since is learned again
    assert await _held(rig, "t", one) > 0
    assert await _warm(rig, "5", one, "run-2", "t") > 0
    assert rig.registry.get_sample_value(CORRECTIONS, RESTART) == 1


async def test_a_late_warm_of_the_run_before_the_restart_neither_wipes_nor_records(
    tokenizer: Tokenizer,
) -> None:
    rig = Rig(tokenizer)
    one, two = _ask(AGENT, "Where is order 7?"), _ask(FAQ, "When do you open?")
    await _warm(rig, "1", one, "run-1", "t")
    await _warm(rig, "2", one, "run-2", "t")  # restarted: wiped, then this prompt learned
    await _warm(rig, "3", two, "run-1", "u")  # a call that ended on the old run, late
    assert rig.registry.get_sample_value(CORRECTIONS, RESTART) == 1
    assert await _held(rig, "t", one) > 0  # the new run's blocks stay
    assert await _held(rig, "u", two) == 0  # the dead run's prefill is held by no engine


async def test_no_run_told_or_the_first_run_seen_keeps_the_view(tokenizer: Tokenizer) -> None:
    rig = Rig(tokenizer)
    one = _ask(AGENT, "Where is order 7?")
    await _warm(rig, "1", one, "", "t")  # an older router or replica: nothing known
    await _warm(rig, "2", one, "run-1", "t")  # the first run seen: no evidence of a restart
    await _warm(rig, "3", one, "", "t")
    assert await _warm(rig, "4", one, "run-1", "t") > 0
    assert rig.registry.get_sample_value(CORRECTIONS, RESTART) is None
