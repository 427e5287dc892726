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


async def _replayed(
    rig: Rig, rid: str, request: pb.CompleteRequest, run: str, tenant: str, at_ms: int
) -> int:
    """A WARM as the router's billing outbox replays it: with the request, its Plan's read
    and time (``planned_at_ms``), and the run that answered the call then."""
    split = await rig.core.warm(
        tenant,
        rid,
        MODEL,
        request,
        "a",
        max_read_tokens=0,
        planned_at_ms=at_ms,
        kv_cached_unreported=True,
        replica_instance=run,
    )
    return split.read_tokens


async def test_a_replayed_warm_of_a_run_never_seen_here_neither_wipes_nor_becomes_current(
    tokenizer: Tokenizer,
) -> None:
    """The reviewer's flip: a prefix-cache that knows only the live run (restarted itself,
    another process, or the old run fell off the kept ones) gets the outbox's replay of a
    call the previous run answered. Before, that run became current: the live run's view was
    wiped and each later WARM of the live run was taken as late, recording nothing (the live
    conversation's turns read [656, 0, 0, 0, 0]: every tenant billed full input there)."""
    rig = Rig(tokenizer)
    one, two = _ask(AGENT, "Where is order 7?"), _ask(FAQ, "When do you open?")
    long_ago = rig.clock.now_ms()
    rig.clock.advance(s=60)
    assert await _warm(rig, "1", one, "run-B", "t") == 0  # the live engine
    reads = [await _warm(rig, "2", one, "run-B", "t")]
    assert await _replayed(rig, "old-1", two, "run-A", "u", long_ago) == 0
    for i in range(3, 7):
        rig.clock.advance(s=1)
        reads.append(await _warm(rig, str(i), one, "run-B", "t"))
    assert reads[0] > 0 and reads == [reads[0]] * 5, reads
    assert rig.registry.get_sample_value(CORRECTIONS, RESTART) is None
    assert await _held(rig, "u", two) == 0  # the old run's prefill: recorded nowhere


async def test_a_replayed_warm_of_an_unknown_run_before_any_run_records_nothing(
    tokenizer: Tokenizer,
) -> None:
    rig = Rig(tokenizer)
    one = _ask(AGENT, "Where is order 7?")
    await _replayed(rig, "old-1", one, "run-A", "t", rig.clock.now_ms())
    assert await _held(rig, "t", one) == 0  # no engine is known to hold it
    # the live run is then the first seen: nothing to wipe, its prefill learned
    assert await _warm(rig, "1", one, "run-B", "t") == 0
    assert await _warm(rig, "2", one, "run-B", "t") > 0
    assert rig.registry.get_sample_value(CORRECTIONS, RESTART) is None


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
