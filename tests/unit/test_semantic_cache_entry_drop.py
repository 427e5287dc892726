"""Dropping one entry (the Admin API's Invalidate by entry_id): the answers in flight of the
tenant cannot bring it back under a new id, not even after a restart, and a drop counts only
the entries it removed that were still live."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from cachemesh.v1 import semantic_cache_pb2 as sc
from cachemesh.v1 import semantic_cache_pb2_grpc as sc_grpc
from services.common.clock import ManualClock
from services.semantic_cache import entries
from services.semantic_cache.api import SemanticCacheApi
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.leases import Leases
from services.semantic_cache.persistence import SnapshotStore
from services.semantic_cache.servicer import SemanticCacheService
from services.semantic_cache.snapshotter import Snapshotter
from services.semantic_cache.tenant_policy import TenantPolicies
from services.semantic_cache.wal import WriteAheadLog
from tests.unit.semantic_cache_support import FakeEmbedder, make_request
from tests.unit.test_semantic_cache_grpc import ANSWER, AUTH, start
from tests.unit.test_semantic_cache_persistence import new_cache, q
from tests.unit.test_semantic_cache_rules import answer

HARMFUL = "Can I mix bleach and ammonia to clean tiles?"


@pytest.fixture
async def stub() -> AsyncIterator[sc_grpc.SemanticCacheAsyncStub]:
    cache = SemanticCache(FakeEmbedder(), ManualClock(), threshold=0.8, ttl_s=3600.0)
    api = SemanticCacheApi(cache, policies=TenantPolicies())
    server, port = await start(SemanticCacheService(api))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield sc_grpc.SemanticCacheStub(channel)
    await server.stop(None)


async def test_an_answer_looked_up_before_an_entry_drop_is_not_stored_after_it(
    stub: sc_grpc.SemanticCacheAsyncStub,
) -> None:
    """R1 and R2 ask the same question at once; R1's answer is stored (entry A), an operator
    drops A (a harmful answer), then R2's model call ends with the same answer: its Store
    must not serve it again as entry B."""
    first, second = make_request(HARMFUL), make_request(HARMFUL)
    first.request_id, second.request_id = "r1", "r2"
    for request in (first, second):
        missed = await stub.Lookup(sc.LookupRequest(tenant="a", request=request), metadata=AUTH)
        assert not missed.hit
    kept = await stub.Store(
        sc.StoreRequest(tenant="a", request=first, answer=ANSWER), metadata=AUTH
    )
    assert kept.stored
    drop = sc.DropRequest(tenant="a", entry_id=kept.entry_id)
    assert (await stub.Drop(drop, metadata=AUTH)).dropped == 1
    late = await stub.Store(
        sc.StoreRequest(tenant="a", request=second, answer=ANSWER), metadata=AUTH
    )
    assert not late.stored and "after this request's lookup" in late.skip_reason
    after = await stub.Lookup(
        sc.LookupRequest(tenant="a", request=make_request(HARMFUL)), metadata=AUTH
    )
    assert not after.hit


@pytest.mark.parametrize("restart", ["graceful", "crash"])
async def test_an_entry_drop_still_refuses_a_late_store_after_a_restart(
    tmp_path: Path, restart: str
) -> None:
    clock = ManualClock()
    cache = new_cache(clock)
    snapshots = Snapshotter(SnapshotStore(tmp_path), clock, 0, WriteAheadLog(tmp_path / "wal"))
    await snapshots.open(cache)
    asked = dataclasses.replace(q(HARMFUL), request_id="r2")
    assert not (await cache.check(asked)).hit  # R2's model call starts
    entry = await cache.store(q(HARMFUL), answer(b"HARMFUL"))  # R1's answer
    clock.advance(s=5)
    assert await cache.drop_entry("a", entry.entry_id) == 1
    if restart == "graceful":
        await snapshots.stop()
    clock.advance(s=30)
    revived = new_cache(clock)
    await Snapshotter(SnapshotStore(tmp_path), clock, 0, WriteAheadLog(tmp_path / "wal")).open(
        revived
    )
    stored = await revived.store(asked, answer(b"HARMFUL"))
    assert not stored.stored and "after this request's lookup" in stored.skip_reason
    assert not (await revived.check(q(HARMFUL))).hit


async def test_a_drop_counts_only_the_entries_still_live() -> None:
    """Three entries of a 1 s TTL, two seconds later: a drop of all of them removes 0 live
    ones (the 3 expired are counted as expirations, not as invalidations)."""
    clock = ManualClock()
    cache = SemanticCache(FakeEmbedder(), clock, threshold=0.8, ttl_s=1.0)
    ids = []
    for question in ("first question here", "second one about pets", "third about cars"):
        ids.append((await cache.store(q(question), answer(b"x"))).entry_id)
    clock.advance(s=2)
    assert await cache.drop_entry("a", ids[0]) == 0
    assert await cache.drop("a", "") == 0
    assert await cache.drop("a") == 0
    assert (cache.stats.invalidations, cache.stats.expirations) == (0, 3)


@pytest.mark.parametrize("duplicate_waits", [False, True])
async def test_a_duplicate_lookup_after_a_purge_does_not_clear_the_first_calls_store(
    duplicate_waits: bool,
) -> None:
    """R1 misses and leads its model call; the operator purges the tenant (a harmful answer);
    the same request (same request_id: a duplicate sent to a second router, or a retry not
    marked as one) then looks up again. The first call's answer predates the purge: its Store
    must not put it back. Before, the second Lookup's miss overwrote the purge count noted for
    the id, and the pre-purge answer was stored and served (1 of 1)."""
    clock = ManualClock()
    leases = Leases(clock, 30.0)
    cache = SemanticCache(FakeEmbedder(), clock, threshold=0.8, ttl_s=3600.0, leases=leases)
    asked = dataclasses.replace(q(HARMFUL), request_id="r1")
    first = await cache.check(asked)
    assert first.leader  # R1's model call starts
    assert await cache.drop("a") == 0
    duplicate = await cache.check(asked, wait_s=0.01 if duplicate_waits else 0.0)
    assert not duplicate.hit
    late = await cache.store(asked, answer(b"HARMFUL"), lease_id=first.lease_id)
    assert not late.stored and "after this request's lookup" in late.skip_reason
    assert not (await cache.check(q(HARMFUL))).hit


@pytest.mark.parametrize("restart", [False, True])
async def test_an_entry_drop_also_drops_what_a_store_on_its_way_replaced_it_with(
    tmp_path: Path, restart: bool
) -> None:
    """R1 and R2 ask the same question at once and both miss; R1's answer is stored (entry A).
    The operator drops A while R2's Store, past the purge guard, waits for its log fsync: that
    Store replaced A first, and the drop then found no such id (dropped 0) while R2's answer,
    the same one, stayed served under a new id, a restart included (1 of 1). Now the drop
    also drops what replaced A since it was called, durably."""
    clock = ManualClock()
    cache = new_cache(clock)
    wal = WriteAheadLog(tmp_path / "wal")
    await Snapshotter(SnapshotStore(tmp_path), clock, 0, wal).open(cache)
    first, second = (dataclasses.replace(q(HARMFUL), request_id=r) for r in ("r1", "r2"))
    assert not (await cache.check(first)).hit
    assert not (await cache.check(second)).hit
    entry = await cache.store(first, answer(b"HARMFUL"))
    late = asyncio.create_task(cache.store(second, answer(b"HARMFUL")))
    await asyncio.sleep(0)  # logged, its fsync on
    dropped = await cache.drop_entry("a", entry.entry_id)
    assert (await late).stored  # its lookup came first: it was stored, and is dropped
    assert dropped == 1
    assert not (await cache.check(q(HARMFUL))).hit
    if restart:  # a crash: the log alone
        revived = new_cache(clock)
        await Snapshotter(SnapshotStore(tmp_path), clock, 0, WriteAheadLog(tmp_path / "wal")).open(
            revived
        )
        assert not (await revived.check(q(HARMFUL))).hit
        assert len(revived) == 0


@pytest.mark.parametrize("restart", [False, True])
async def test_a_drop_of_an_entry_a_store_already_replaced_drops_what_replaced_it(
    tmp_path: Path, restart: bool
) -> None:
    """R1 and R2 ask the same question and both miss; R1's answer is stored (entry A), then
    R2's Store of the same answer replaces A (applied, its reply sent); the operator, who saw
    A's harmful answer, drops A. The drop found no such id (dropped 0) and the answer stayed
    served under R2's id (a real process: 10 of 10 with the drop 50 ms after R2's Store, 14
    of 20 at 1 ms: the fix before this one covered only a Store still waiting for its fsync).
    Now a drop follows A to what replaced it, the tenant's own only, a restart's replay
    included."""
    clock = ManualClock()
    cache = new_cache(clock)
    await Snapshotter(SnapshotStore(tmp_path), clock, 0, WriteAheadLog(tmp_path / "wal")).open(
        cache
    )
    first, second = (dataclasses.replace(q(HARMFUL), request_id=r) for r in ("r1", "r2"))
    assert not (await cache.check(first)).hit
    assert not (await cache.check(second)).hit
    entry = await cache.store(first, answer(b"HARMFUL"))
    replacement = await cache.store(second, answer(b"HARMFUL"))
    assert replacement.stored and replacement.entry_id != entry.entry_id
    clock.advance(ms=50)
    assert await cache.drop_entry("b", entry.entry_id) == 0  # another tenant's id: nothing
    assert (await cache.check(q(HARMFUL))).hit
    assert await cache.drop_entry("a", entry.entry_id) == 1
    assert not (await cache.check(q(HARMFUL))).hit
    assert await cache.drop_entry("a", entry.entry_id) == 0  # nothing left to follow it to
    if restart:  # a crash: the log alone
        revived = new_cache(clock)
        await Snapshotter(SnapshotStore(tmp_path), clock, 0, WriteAheadLog(tmp_path / "wal")).open(
            revived
        )
        assert not (await revived.check(q(HARMFUL))).hit
        assert len(revived) == 0


async def test_a_drop_follows_an_entry_through_each_store_that_replaced_it() -> None:
    """A replaced by B, B by C: a drop of A removes C (the question's current answer), once;
    the tenant's other entries stay."""
    cache = SemanticCache(FakeEmbedder(), ManualClock(), threshold=0.8, ttl_s=3600.0)
    kept = await cache.store(q("How do I rotate my API key?"), answer(b"kept"))
    ids = [(await cache.store(q(HARMFUL), answer(b"HARMFUL"))).entry_id for _ in range(3)]
    assert len(set(ids)) == 3 and len(cache) == 2
    assert await cache.drop_entry("a", ids[0]) == 1
    assert not (await cache.check(q(HARMFUL))).hit
    assert len(cache) == 1 and (await cache.check(q("How do I rotate my API key?"))).hit
    assert await cache.drop_entry("a", ids[1]) == 0
    assert await cache.drop_entry("a", kept.entry_id) == 1


async def test_a_tenant_keeps_only_its_last_replacements(monkeypatch: pytest.MonkeyPatch) -> None:
    """The replacements followed are bounded a tenant (the oldest forgotten first) and go
    with the tenant's last entry: a tenant's stream of refreshed answers cannot grow them."""
    monkeypatch.setattr(entries, "REPLACED_PER_TENANT", 2)
    cache = SemanticCache(FakeEmbedder(), ManualClock(), threshold=0.8, ttl_s=3600.0)
    ids = [(await cache.store(q(HARMFUL), answer(b"HARMFUL"))).entry_id for _ in range(4)]
    assert await cache.drop_entry("a", ids[0]) == 0  # its replacement is no longer noted
    assert await cache.drop_entry("a", ids[1]) == 1  # ids[1] -> ids[2] -> ids[3]
    assert cache._replaced == {}  # the tenant holds nothing: nothing kept for it


async def test_a_drop_that_followed_a_replacement_holds_after_a_snapshot_and_a_crash(
    tmp_path: Path,
) -> None:
    """A replaced by B, a snapshot (it holds B, not that B replaced A), a drop of A (B goes),
    then a crash: the log after the snapshot holds the drop of A, which a replay cannot follow
    to B; B is logged by its own id too, so it stays dropped."""
    clock = ManualClock()
    cache = new_cache(clock)
    snapshots = Snapshotter(SnapshotStore(tmp_path), clock, 0, WriteAheadLog(tmp_path / "wal"))
    await snapshots.open(cache)
    entry = await cache.store(q(HARMFUL), answer(b"HARMFUL"))
    assert (await cache.store(q(HARMFUL), answer(b"HARMFUL"))).stored
    assert await snapshots.save()
    assert await cache.drop_entry("a", entry.entry_id) == 1
    revived = new_cache(clock)  # a crash: the snapshot and the log after it
    await Snapshotter(SnapshotStore(tmp_path), clock, 0, WriteAheadLog(tmp_path / "wal")).open(
        revived
    )
    assert not (await revived.check(q(HARMFUL))).hit
    assert len(revived) == 0
