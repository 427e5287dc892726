"""A self-hosted replica's engine restarted (a deploy, an OOM kill: its KV cache gone): the
first WARM from its new run (``CommitRequest.replica_instance``, the engine's
``GenerateStart.engine_instance``) forgets prefix-cache's whole view of the replica, every
tenant's blocks, before its own read is judged; counted (``cause="restart"``). Unset (an older
router or replica): the view is kept, as before."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cachemesh.v1 import gateway_pb2 as pb
from services.common.tokens import Tokenizer, load_cl100k
from services.prefix_cache.core import VIEW_WIPE_ATTRIBUTE
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

    # the engine restarted: the next WARM on it comes from a new run, and reads nothing; its
    # span says why the view went (only that WARM's)
    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("warm 4"):
        assert await _warm(rig, "4", one, "run-2", "t") == 0
    assert rig.registry.get_sample_value(CORRECTIONS, RESTART) == 1
    # the other tenant's conversation is no longer predicted there (no stall to find it)
    assert await _held(rig, "u", two) == 0
    with tracer.start_as_current_span("warm 4b"):  # the same run again: no wipe to name
        assert await _warm(rig, "4b", two, "run-2", "u") == 0
    spans = exported.get_finished_spans()
    reasons = {s.name: (s.attributes or {}).get(VIEW_WIPE_ATTRIBUTE) for s in spans}
    assert reasons == {"warm 4": "engine_restart", "warm 4b": None}, reasons
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


async def _resent(
    rig: Rig, rid: str, request: pb.CompleteRequest, run: str, tenant: str, at_ms: int
) -> int:
    """A WARM as the router sends it again when prefix-cache no longer holds its Plan
    (``Calls.commit_warm``: restarted, the memo's eviction, another prefix-cache process):
    with the request, its Plan's read and time (``planned_at_ms``), and the run that answered.
    (The billing outbox's replay, ``billing._replay_warm``, names no replica nor run.)"""
    split = await rig.core.warm(
        tenant,
        rid,
        MODEL,
        request,
        "a",
        max_read_tokens=0,
        planned_at_ms=at_ms,
        plan_id="gone",
        kv_cached_unreported=True,
        replica_instance=run,
    )
    return split.read_tokens


async def _journalled(
    rig: Rig, rid: str, plan_id: str, run: str, tenant: str, read: int = 0
) -> int:
    """A WARM as the router's open-call journal sends it again after a router restart: the
    WARM first sent (``warm_commit``: its ``plan_id``, no request, no ``planned_at_ms``), whose
    Plan this process holds; the call's time is that Plan's."""
    split = await rig.core.warm(
        tenant,
        rid,
        MODEL,
        None,
        "a",
        max_read_tokens=read,
        plan_id=plan_id,
        kv_cached_unreported=True,
        replica_instance=run,
    )
    return split.read_tokens


async def test_a_late_warm_of_a_run_never_seen_here_neither_wipes_nor_becomes_current(
    tokenizer: Tokenizer,
) -> None:
    """The reviewer's flip: a prefix-cache that knows only the live run (restarted itself,
    another process, or the old run fell off the kept ones) gets a WARM, sent again late, of a
    call the previous run answered. Before, that run became current: the live run's view was
    wiped and each later WARM of the live run was taken as late, recording nothing (the live
    conversation's turns read [656, 0, 0, 0, 0]: every tenant billed full input there). Its
    call time (its Plan's, long before the live run's first WARM) marks it late."""
    rig = Rig(tokenizer)
    one, two = _ask(AGENT, "Where is order 7?"), _ask(FAQ, "When do you open?")
    long_ago = rig.clock.now_ms()
    old = await rig.core.plan("u", MODEL, two, ["a"])  # held here, its time long ago
    rig.clock.advance(s=50)
    assert await _warm(rig, "1", one, "run-B", "t") == 0  # the live engine
    reads = [await _warm(rig, "2", one, "run-B", "t")]
    assert await _journalled(rig, "old-1", old.plan_id, "run-A", "u") == 0
    assert await _resent(rig, "old-2", two, "run-A", "u", long_ago) == 0
    for i in range(3, 7):
        rig.clock.advance(s=1)
        reads.append(await _warm(rig, str(i), one, "run-B", "t"))
    assert reads[0] > 0 and reads == [reads[0]] * 5, reads
    assert rig.registry.get_sample_value(CORRECTIONS, RESTART) is None
    assert await _held(rig, "u", two) == 0  # the old run's prefill: recorded nowhere


async def test_a_journalled_warm_of_an_unknown_run_before_any_run_is_wiped_by_the_live_one(
    tokenizer: Tokenizer,
) -> None:
    """The open-call journal's WARM (its Plan held here, made long ago) of a run this process
    has not seen, with no run seen yet: nothing to judge it late against, so its run is the
    first one seen (as any first run); the live run's first WARM, called after it, forgets
    that view (counted once) and its own prefill is learned."""
    rig = Rig(tokenizer)
    one, two = _ask(AGENT, "Where is order 7?"), _ask(FAQ, "When do you open?")
    old = await rig.core.plan("u", MODEL, two, ["a"])
    rig.clock.advance(s=50)
    assert await _journalled(rig, "old-1", old.plan_id, "run-A", "u") == 0
    assert await _warm(rig, "1", one, "run-B", "t") == 0
    assert await _held(rig, "u", two) == 0  # the dead run's prefill: forgotten
    assert await _warm(rig, "2", one, "run-B", "t") > 0
    assert rig.registry.get_sample_value(CORRECTIONS, RESTART) == 1


async def test_a_warm_sent_again_for_a_plan_not_held_here_records_on_a_fresh_process(
    tokenizer: Tokenizer,
) -> None:
    """The router's live re-send (``planned_at_ms``: its Plan's time, moments ago) when this
    prefix-cache does not hold the Plan (it restarted, its memo evicted it, another process
    made it): on a fresh process its run is the first seen and its prefill is recorded.
    Before, any WARM with ``planned_at_ms`` was taken as an outbox replay: it recorded
    nothing (the conversation's next turn read 0, was 656)."""
    rig = Rig(tokenizer)
    one = _ask(AGENT, "Where is order 7?")
    assert await _resent(rig, "1", one, "run-1", "t", rig.clock.now_ms() - 50) == 0
    assert await _held(rig, "t", one) > 0
    assert await _warm(rig, "2", one, "run-1", "t") > 0
    assert rig.registry.get_sample_value(CORRECTIONS, RESTART) is None


async def test_a_warm_sent_again_of_a_new_run_forgets_the_view(tokenizer: Tokenizer) -> None:
    """The engine restarted and its first call's WARM is sent again (its Plan not held here):
    its new run forgets the replica's view, every tenant's blocks. Before, it was taken as an
    outbox replay and wiped nothing: the view went on predicting the restarted engine warm."""
    rig = Rig(tokenizer)
    one, two = _ask(AGENT, "Where is order 7?"), _ask(FAQ, "When do you open?")
    await _warm(rig, "1", one, "run-1", "t")
    await _warm(rig, "2", two, "run-1", "u")
    assert await _held(rig, "t", one) > 0 and await _held(rig, "u", two) > 0
    rig.clock.advance(s=10)
    assert await _resent(rig, "3", one, "run-2", "t", rig.clock.now_ms() - 50) == 0
    assert rig.registry.get_sample_value(CORRECTIONS, RESTART) == 1
    assert await _held(rig, "u", two) == 0
    assert await _warm(rig, "4", one, "run-2", "t") > 0  # the new run's prefill: learned


async def test_a_warm_of_an_unknown_run_called_before_the_current_run_was_seen_is_late(
    tokenizer: Tokenizer,
) -> None:
    """Not a replay, but a call made (its Plan's time, ``arrived_at_ms`` without one) before
    the current run's first WARM here: it cannot be of a newer run."""
    rig = Rig(tokenizer)
    one, two = _ask(AGENT, "Where is order 7?"), _ask(FAQ, "When do you open?")
    before = rig.clock.now_ms()
    rig.clock.advance(s=5)
    await _warm(rig, "1", one, "run-B", "t")
    split = await rig.core.warm(
        "u",
        "old-1",
        MODEL,
        two,
        "a",
        kv_cached_unreported=True,
        replica_instance="run-A",
        arrived_at_ms=before,
    )
    assert split.read_tokens == 0
    assert await _held(rig, "t", one) > 0 and await _held(rig, "u", two) == 0
    assert rig.registry.get_sample_value(CORRECTIONS, RESTART) is None
    # a later call of a new run is a restart as before
    rig.clock.advance(s=1)
    assert await _warm(rig, "2", one, "run-C", "t") == 0
    assert rig.registry.get_sample_value(CORRECTIONS, RESTART) == 1
