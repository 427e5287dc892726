"""An answer refused for its row (``auto.small`` repointed: the Lookup's ``accepted_models``
no longer names the row that made it) is served to no Lookup of its scope while the table says
so. Kept, it hid every accepted paraphrase behind it until its TTL (0 of 9 served); a Lookup
that meets it (the exact match, or any top-k candidate at the threshold) now drops it (logged,
tenant- and scope-wise, that entry alone, without waiting for it), stays a miss itself, and
once the old answers near a question have been met, a Lookup of it is the one the cache
without them makes: it can never serve what that cache would not (a review's cases A, B, C,
where passing it over did; D, where dropping only the shortlist made the next Lookup
ambiguous). Tests wait for the drops explicitly (``drops_done``)."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import types
from pathlib import Path

import pytest

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import semantic_cache_pb2 as sc
from services.common.clock import ManualClock
from services.common.metrics import new_registry
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.metrics import StoreCollector, refusal_reason
from services.semantic_cache.persistence import SnapshotStore
from services.semantic_cache.query import Query, query_from_request
from services.semantic_cache.records import Answer, CheckResult
from services.semantic_cache.snapshotter import Snapshotter
from services.semantic_cache.wal import WriteAheadLog
from tests.unit.semantic_cache_support import FakeEmbedder, Placed, make_request
from tests.unit.test_semantic_cache_reading import shipped_cache
from tests.unit.test_service_metrics import value

# auto.small repointed from sim-small to claude-haiku-4-5: the rows auto resolves to now
NOW = ("claude-haiku-4-5", "sim-large")
QUESTION, OLD, VISA, NEW = (
    "how do i renew my passport",
    "how can i renew a passport",  # answered by sim-small (the old row)
    "renew visa",  # another question, answered by sim-large
    "passport renewal steps",  # the question again, answered by sim-large
)
OLD_TOO = "passport renewal form"  # the question again, answered by sim-small
DROPS = "cachemesh_semantic_cache_refused_drops_total"


def _answer(model: str, text: str) -> Answer:
    cached = sc.CachedAnswer(
        content=[pb.ContentBlock(text=text)],
        model=model,
        tier="large" if model == "sim-large" else "small",
        stop_reason="end_turn",
        output_tokens=12,
    )
    return Answer(cached.SerializeToString(), "end_turn", 12, False, True)


def _q(text: str, tenant: str = "a", accepted: tuple[str, ...] = NOW) -> Query:
    query = query_from_request(tenant, make_request(text, model="auto"))
    return dataclasses.replace(query, accepted_models=accepted)


def _served(result: CheckResult) -> str | None:
    if result.entry is None:
        return None
    return sc.CachedAnswer.FromString(result.entry.answer.payload).content[0].text


async def _placed(placed: dict[str, tuple[float, int, str, str]], old: bool) -> SemanticCache:
    """text -> (cosine to the question, axis, model, answer); threshold 0.9, margin 0.03, no
    verifier (it accepts every candidate). ``old``: with sim-small's answers, else without."""
    cosines = {QUESTION: (1.0, 1)} | {t: (c, axis) for t, (c, axis, _, _) in placed.items()}
    cache = SemanticCache(Placed(cosines), ManualClock(), threshold=0.9, margin=0.03)
    for text, (_, _, model, answer) in placed.items():
        if old or model != "sim-small":
            await cache.store(_q(text), _answer(model, answer))
    return cache


CASES = {
    "A": {OLD: (0.96, 1, "sim-small", "DS-82"), VISA: (0.94, 2, "sim-large", "visa")},
    "B": {
        OLD: (0.99, 1, "sim-small", "DS-82"),
        VISA: (0.95, 2, "sim-large", "visa"),
        NEW: (0.93, 1, "sim-large", "DS-82b"),
    },
    "C": {
        OLD: (0.97, 1, "sim-small", "DS-82"),
        VISA: (0.93, 2, "sim-large", "visa"),
        NEW: (0.92, 1, "sim-large", "DS-82b"),
    },
    "counterexample": {OLD: (0.95, 1, "sim-small", "DS-82"), VISA: (0.94, 2, "sim-large", "visa")},
    # a chain: the second old answer is beyond the margin of the first (0.99 - 0.03) but
    # within that of the new nearest (0.95 - 0.03): dropping only the shortlist made the
    # second Lookup ambiguous and the third served, where the cache without them serves at once
    "D": {
        OLD: (0.99, 1, "sim-small", "DS-82"),
        NEW: (0.95, 1, "sim-large", "DS-82b"),
        OLD_TOO: (0.93, 1, "sim-small", "DS-11"),
    },
}


@pytest.mark.parametrize("case", sorted(CASES))
async def test_after_the_first_miss_a_lookup_is_the_cache_without_the_old_answer(case: str) -> None:
    """The review's cases, where a stand-in rule served the visa answer (A, B, C), and a
    chain of old answers (D: only the shortlist was dropped, so the second Lookup was
    ambiguous): the first Lookup meets the old row's answer nearest and is a miss (reason
    model), as before; every Lookup after its drops is what the same cache without the old
    answers gives (served or not, and why), never more. Before, the old answer was refused at
    every Lookup until its TTL."""
    placed = CASES[case]
    baseline = await (await _placed(placed, old=False)).check(_q(QUESTION))
    cache = await _placed(placed, old=True)
    first = await cache.check(_q(QUESTION))
    assert first.entry is None and refusal_reason(first.refusal) == "model", first.refusal
    await cache.drops_done()
    for _ in range(2):
        after = await cache.check(_q(QUESTION))
        assert (_served(after), refusal_reason(after.refusal)) == (
            _served(baseline),
            refusal_reason(baseline.refusal),
        ), after.refusal
        assert after.similarity == pytest.approx(baseline.similarity, abs=1e-6)
    # the old answers alone went
    assert len(cache) == len([1 for _, _, model, _ in placed.values() if model != "sim-small"])


async def test_an_old_answer_within_the_margin_of_the_nearest_is_dropped_as_well() -> None:
    """sim-large's answer to the question nearest (0.95), the old row's within the margin
    (0.94), another answer: every Lookup was ambiguous while the old one was held; the first
    still is (it is what it was), the next is served sim-large's answer."""
    cache = await _placed(
        {NEW: (0.95, 1, "sim-large", "DS-82b"), OLD: (0.94, 1, "sim-small", "DS-82")}, old=True
    )
    first = await cache.check(_q(QUESTION))
    assert first.entry is None and first.refusal.startswith("ambiguous"), first.refusal
    await cache.drops_done()
    assert _served(await cache.check(_q(QUESTION))) == "DS-82b"


# (an old sim-small paraphrase, two sim-large ones, three paraphrases asked), for the figure
TOPICS = [
    (
        "How do I reset my password?",
        ("I forgot my password, how can I reset it?", "How can I change my password?"),
        ("How do I reset my password", "how can i reset my password?", "How to reset my pwd?"),
    ),
    (
        "How do I cancel my subscription?",
        ("How can I cancel my subscription?", "I want to cancel my subscription, how?"),
        (
            "How do I cancel my subscription",
            "What is the way to cancel my subscription?",
            "how can i cancel the subscription?",
        ),
    ),
    (
        "How do I delete my account?",
        ("How can I delete my account?", "I want to delete my account, how?"),
        (
            "How do I delete my account",
            "What are the steps to delete my account?",
            "how do I delete the account?",
        ),
    ),
]


async def _topics(old: bool) -> SemanticCache:
    cache = shipped_cache()
    for topic, (before, now, _) in enumerate(TOPICS):
        if old:
            await cache.store(_q(before), _answer("sim-small", "x"))
        for text in now:
            await cache.store(_q(text), _answer("sim-large", f"topic {topic}"))
    return cache


async def _round(cache: SemanticCache) -> int:
    """How many of the nine paraphrases an auto Lookup is served sim-large's answer to."""
    served = 0
    for topic, (_, _, asked) in enumerate(TOPICS):
        for text in asked:
            served += _served(await cache.check(_q(text))) == f"topic {topic}"
    return served


async def test_an_old_rows_answers_hide_paraphrases_only_until_they_are_met() -> None:
    """The figure, with the shipped embedder and verifier: 0 of 9 paraphrases were served
    while the old row's answers were held, at every round until their TTL. Now the round that
    meets them drops them (its Lookups that met one are misses), and the next round serves as
    many as the cache that never held them."""
    without = await _round(await _topics(old=False))
    assert without >= 6  # the shipped pair serves these paraphrases
    cache = await _topics(old=True)
    await _round(cache)
    await cache.drops_done()
    assert await _round(cache) == without
    assert len(cache) == 6


async def test_an_exact_match_refused_for_its_row_is_dropped() -> None:
    """The question asked word for word, its answer the old row's: passed over (the Lookup
    goes on to the paraphrases, as before) and dropped; a plain Lookup (any row, a named
    model's) then finds nothing of it."""
    cache = SemanticCache(FakeEmbedder(), ManualClock(), threshold=0.8)
    await cache.store(_q(QUESTION), _answer("sim-small", "DS-82"))
    result = await cache.check(_q(QUESTION))
    assert result.entry is None and refusal_reason(result.refusal) == "model", result.refusal
    await cache.drops_done()
    assert len(cache) == 0
    assert (await cache.check(_q(QUESTION, accepted=()))).entry is None


async def test_a_tier_refusal_drops_nothing() -> None:
    """A retry forced to the large tier refuses the small tier's answer for one request:
    other Lookups are served it, so it is kept."""
    cache = SemanticCache(FakeEmbedder(), ManualClock(), threshold=0.8)
    await cache.store(_q(QUESTION), _answer("claude-haiku-4-5", "DS-82"))
    forced = dataclasses.replace(_q(QUESTION), accepted_tiers=("large",))
    assert refusal_reason((await cache.check(forced)).refusal) == "tier"
    assert len(cache) == 1
    assert _served(await cache.check(_q(QUESTION))) == "DS-82"


async def test_a_draining_cache_drops_nothing() -> None:
    """A draining cache writes nothing (its Lookups lead no Store): the answer stays, refused."""
    cache = SemanticCache(FakeEmbedder(), ManualClock(), threshold=0.8)
    await cache.store(_q(QUESTION), _answer("sim-small", "DS-82"))
    assert (await cache.check(_q(QUESTION), lead=False)).entry is None
    assert len(cache) == 1


async def test_only_the_lookups_tenant_and_scope_lose_the_answer() -> None:
    """Tenant b's entry of the same question, and tenant a's of another scope (the model
    sim-small named), are untouched by tenant a's auto Lookup."""
    cache = SemanticCache(FakeEmbedder(), ManualClock(), threshold=0.8)
    named = query_from_request("a", make_request(QUESTION, model="sim-small"))
    await cache.store(_q(QUESTION), _answer("sim-small", "a's"))
    await cache.store(_q(QUESTION, "b"), _answer("sim-small", "b's"))
    await cache.store(named, _answer("sim-small", "named"))
    assert (await cache.check(_q(QUESTION))).entry is None
    await cache.drops_done()
    assert len(cache) == 2
    assert _served(await cache.check(_q(QUESTION, "b", accepted=()))) == "b's"
    assert _served(await cache.check(named)) == "named"


async def _logged(tmp_path: Path, clock: ManualClock) -> tuple[SemanticCache, Snapshotter]:
    cache = SemanticCache(FakeEmbedder(), clock, threshold=0.8)
    snapshots = Snapshotter(SnapshotStore(tmp_path), clock, 0, WriteAheadLog(tmp_path / "wal"))
    await snapshots.open(cache)
    return cache, snapshots


def _drop_records(tmp_path: Path) -> list[dict[str, object]]:
    return [r for r in WriteAheadLog(tmp_path / "wal").open() if r["op"] == "drop_entry"]


async def test_concurrent_lookups_drop_the_answer_once_and_a_restart_keeps_it_dropped(
    tmp_path: Path,
) -> None:
    """Three Lookups meet the old answer at once: one drop (one log record, counted once),
    no error, each a miss. A restart from the log alone (a crash) does not bring it back."""
    clock = ManualClock()
    cache, _ = await _logged(tmp_path, clock)
    await cache.store(_q(QUESTION), _answer("sim-small", "DS-82"))
    await cache.store(_q(QUESTION + " please"), _answer("sim-large", "new"))
    registry = new_registry()
    registry.register(StoreCollector(cache.stats, 4))
    results = await asyncio.gather(*(cache.check(_q(QUESTION)) for _ in range(3)))
    assert all(r.entry is None or _served(r) == "new" for r in results)
    await cache.drops_done()
    assert len(cache) == 1
    assert value(registry, DROPS, reason="model") == 1
    assert len(_drop_records(tmp_path)) == 1
    revived = SemanticCache(FakeEmbedder(), clock, threshold=0.8)
    await Snapshotter(SnapshotStore(tmp_path), clock, 0, WriteAheadLog(tmp_path / "wal")).open(
        revived
    )
    assert len(revived) == 1
    plain = await revived.check(_q(QUESTION, accepted=()))
    assert _served(plain) == "new", plain.refusal  # the old one is gone; the new one served


async def test_a_store_of_the_question_logged_before_the_drop_is_kept(tmp_path: Path) -> None:
    """The new row's answer to the question is being stored (its record logged, its fsync
    on) when a Lookup that does not wait for Stores meets the old answer and drops it: the
    Store replaced the old answer first, so the drop removes nothing, and the new answer is
    served, live and after a crash (an operator's drop by id follows the replacement and
    would have removed the new answer)."""
    clock = ManualClock()
    cache, _ = await _logged(tmp_path, clock)
    await cache.store(_q(QUESTION), _answer("sim-small", "DS-82"))
    late = asyncio.create_task(cache.store(_q(QUESTION), _answer("claude-haiku-4-5", "new")))
    await asyncio.sleep(0)  # logged, its fsync on (the vector is the one just embedded)
    result = await cache.check(_q(QUESTION), waits=False)
    assert result.entry is None and refusal_reason(result.refusal) == "model"
    assert (await late).stored
    await cache.drops_done()
    assert len(_drop_records(tmp_path)) == 1
    assert _served(await cache.check(_q(QUESTION))) == "new"
    assert cache.stats.refused_drops.get("model", 0) == 0  # it found nothing to remove
    revived = SemanticCache(FakeEmbedder(), clock, threshold=0.8)
    await Snapshotter(SnapshotStore(tmp_path), clock, 0, WriteAheadLog(tmp_path / "wal")).open(
        revived
    )
    assert _served(await revived.check(_q(QUESTION))) == "new"


async def test_a_drop_leaves_the_tenants_pending_stores(tmp_path: Path) -> None:
    """The Lookup that dropped the old answer leads the model call; its Store (the new row's
    answer) is stored, as is that of another request of the tenant looked up before the drop
    (an operator's drop would refuse both: its answer predates the drop)."""
    clock = ManualClock()
    cache, _ = await _logged(tmp_path, clock)
    await cache.store(_q(QUESTION), _answer("sim-small", "DS-82"))
    other = dataclasses.replace(_q("where is my invoice"), request_id="r1")
    assert (await cache.check(other)).entry is None
    asked = dataclasses.replace(_q(QUESTION), request_id="r2")
    assert (await cache.check(asked)).entry is None
    await cache.drops_done()
    assert len(cache) == 0
    assert (await cache.store(asked, _answer("claude-haiku-4-5", "new"))).stored
    assert (await cache.store(other, _answer("sim-large", "invoice"))).stored


async def test_a_drop_the_full_disk_refuses_leaves_the_lookup_a_miss(tmp_path: Path) -> None:
    """The log cannot make the drop durable (a full disk, which the log reports): the Lookup
    is the miss it was, no error, and the answer stays (refused as before), after a crash
    too; once the disk has room again, the next Lookup drops it."""
    from tests.unit.test_semantic_cache_full_disk import fill

    clock = ManualClock()
    cache = SemanticCache(FakeEmbedder(), clock, threshold=0.8)
    wal = WriteAheadLog(tmp_path / "wal")
    await Snapshotter(SnapshotStore(tmp_path), clock, 0, wal).open(cache)
    await cache.store(_q(QUESTION), _answer("sim-small", "DS-82"))
    fill(wal)
    result = await cache.check(_q(QUESTION))
    assert result.entry is None and refusal_reason(result.refusal) == "model"
    await cache.drops_done()
    assert len(cache) == 1
    assert cache.stats.refused_drops.get("model", 0) == 0
    revived, _ = await _logged(tmp_path, clock)
    assert len(revived) == 1
    assert (await revived.check(_q(QUESTION))).entry is None
    await revived.drops_done()
    assert len(revived) == 0


async def test_a_drop_record_of_an_unknown_reason_stops_the_replay(tmp_path: Path) -> None:
    """A drop record whose reason this build does not know (a newer one's) is malformed: the
    replay stops naming it rather than drop what it does not understand."""
    from services.semantic_cache.wal import WalError

    wal = WriteAheadLog(tmp_path / "wal")
    wal.open()
    wal.append({"op": "drop_entry", "tenant": "a", "entry_id": "x", "reason": "later"})
    await wal.sync()
    wal.close()
    with pytest.raises(WalError, match="unknown drop reason 'later'") as refused:
        await _logged(tmp_path, ManualClock())
    assert "is a newer build's" in str(refused.value)  # not "malformed", as damage is said


@pytest.mark.parametrize(
    ("record", "said"),
    [
        ({"op": "drop_prefix", "tenant": "a", "prefix": "x"}, "unknown op 'drop_prefix'"),
        ({"op": "drop", "tenant": "a", "namespace": None, "v": 2}, "record version 2"),
    ],
)
async def test_a_newer_builds_record_stops_the_replay_saying_what_to_do(
    tmp_path: Path, record: dict[str, object], said: str
) -> None:
    """A rollback over a log a newer build wrote: a record of an op it does not know, or of a
    later record version (even of an op it knows: it would ignore what that version added),
    stops the replay naming a newer build's record and what to do, not "malformed" (damage)."""
    from services.semantic_cache.wal import WalError

    wal = WriteAheadLog(tmp_path / "wal")
    wal.open()
    wal.append(record)
    await wal.sync()
    wal.close()
    with pytest.raises(WalError, match=re.escape(said)) as refused:
        await _logged(tmp_path, ManualClock())
    message = str(refused.value)
    assert "is a newer build's" in message and "move the snapshot and the wal/" in message
    assert "malformed" not in message


async def test_a_lookup_does_not_wait_for_its_drop() -> None:
    """The drop's log sync hangs (a slow disk) and the Lookup has no deadline (a gRPC call
    without one): the Lookup replies at once, a miss (its result was decided before the
    drop), and the drop is applied once its record is durable. Before, it waited for the drop
    until its deadline (~1.9 s under the router's 2 s), and with none for ever."""
    from tests.unit.test_semantic_cache_inflight import _GatedJournal

    cache = SemanticCache(FakeEmbedder(), ManualClock(), threshold=0.8)
    await cache.store(_q(QUESTION), _answer("sim-small", "DS-82"))
    journal = _GatedJournal()
    cache.attach_journal(journal)
    lookup = asyncio.ensure_future(cache.check(_q(QUESTION)))
    try:
        # a bound on a hang only (the Lookup awaits nothing slow): the old code never returned
        result = await asyncio.wait_for(asyncio.shield(lookup), 30)
    finally:
        journal.gate.set()
        await lookup
    assert result.entry is None and refusal_reason(result.refusal) == "model"
    await cache.drops_done()
    assert len(cache) == 0


async def test_the_drop_counter_is_at_0_from_the_start() -> None:
    """refused_drops_total{reason="model"} is scraped at 0 before any drop (rate() and
    increase() see the first drop as a step), as the module's other labelled counters."""
    cache = SemanticCache(FakeEmbedder(), ManualClock(), threshold=0.8)
    registry = new_registry()
    registry.register(StoreCollector(cache.stats, 4))
    assert registry.get_sample_value(DROPS, {"reason": "model"}) == 0  # None: no series


async def test_each_candidates_answer_is_read_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Lookup reads (parses) each candidate's answer once for both refusals: an 8 MiB
    answer takes ms to parse, on the event loop. Before, the nearest was read twice (its row
    refusal, then its tier and row refusal): 3 reads for case A's two candidates."""
    import services.semantic_cache.query as query_module

    cache = await _placed(CASES["A"], old=True)
    reads: list[bytes] = []

    class _Counted:
        @staticmethod
        def FromString(payload: bytes) -> sc.CachedAnswer:
            reads.append(payload)
            return sc.CachedAnswer.FromString(payload)

    monkeypatch.setattr(query_module, "sc", types.SimpleNamespace(CachedAnswer=_Counted))
    assert (await cache.check(_q(QUESTION))).entry is None
    assert len(reads) == 2 == len(set(reads))


async def test_a_drop_that_fails_for_another_reason_is_said_and_the_answer_stays_refused(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A drop runs on its own: a fault in it other than the log's (which reports its own) was
    left to asyncio's "Task exception was never retrieved", at garbage collection if at all.
    It is an ERROR naming the entry now; the answer stays cached and refused, never served,
    and the next Lookup that meets it drops it."""
    cache = SemanticCache(FakeEmbedder(), ManualClock(), threshold=0.8)
    await cache.store(_q(QUESTION), _answer("sim-small", "DS-82"))
    real = cache.drop_refused

    async def broken(tenant: str, entry_id: str) -> None:
        raise RuntimeError("a fault of ours")

    monkeypatch.setattr(cache, "drop_refused", broken)
    with caplog.at_level("ERROR", logger="cachemesh.semantic_cache"):
        assert (await cache.check(_q(QUESTION))).entry is None
        await cache.drops_done()
    failed = [r for r in caplog.records if "refused for its row failed" in r.getMessage()]
    assert len(failed) == 1 and failed[0].exc_info is not None, caplog.text
    assert len(cache) == 1  # kept, refused
    monkeypatch.setattr(cache, "drop_refused", real)
    assert (await cache.check(_q(QUESTION))).entry is None
    await cache.drops_done()
    assert len(cache) == 0
