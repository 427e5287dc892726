"""semantic-cache keeps nothing under a tenant name the key file could not hold.

It took any non-empty tenant (1 MB, a NUL, "../..", a right-to-left override) and kept
entries, leases, counts and policies under it; ``cachemesh admin stats`` then printed an
18.8 MB table with the raw NUL and RTL characters. Such a name is now refused
(INVALID_ARGUMENT, the key store's rule); entries an older version stored under one still
load at start, from the snapshot and from the write-ahead log, and are kept but served to
no one (they expire with their TTL)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cachemesh.v1 import semantic_cache_pb2 as sc
from services.common.clock import ManualClock
from services.common.errors import Code, RequestError
from services.semantic_cache.api import SemanticCacheApi
from services.semantic_cache.persistence import SnapshotStore
from services.semantic_cache.snapshotter import Snapshotter
from services.semantic_cache.tenant_policy import PolicyChange, TenantPolicies
from services.semantic_cache.wal import WriteAheadLog
from tests.unit.semantic_cache_support import make_request
from tests.unit.test_semantic_cache_persistence import new_cache, q
from tests.unit.test_semantic_cache_rules import answer

BAD = ["../..", "a\x00b", "\u202eevil", "t" * 1_000_000, "_other", "acme\n", "has space"]


@pytest.mark.parametrize("tenant", BAD)
async def test_every_call_refuses_a_tenant_the_key_file_could_not_hold(tenant: str) -> None:
    api = SemanticCacheApi(new_cache(), lease_wait_s=1.0)
    request = make_request("how do i reset my password")
    calls = [
        api.lookup(sc.LookupRequest(tenant=tenant, request=request), 5.0),
        api.store(sc.StoreRequest(tenant=tenant, request=request)),
        api.drop(sc.DropRequest(tenant=tenant)),
        api.release(sc.ReleaseRequest(tenant=tenant, lease_id="x")),
        api.set_policy(sc.SetL1PolicyRequest(tenant=tenant, l1_enabled=False)),
        api.get_policy(sc.L1PolicyRequest(tenant=tenant)),
        api.renew(sc.RenewRequest(tenant=tenant, lease_id="x")),
    ]
    for call in calls:
        with pytest.raises(RequestError) as caught:
            await call
        assert caught.value.code == Code.INVALID_ARGUMENT
        assert caught.value.message.startswith("tenant must be 1 to 64"), caught.value.message
        assert len(caught.value.message) < 300
    with pytest.raises(RequestError) as caught:  # Stats answered a row under the name
        api.stats(sc.L1StatsRequest(tenant=tenant))
    assert caught.value.code == Code.INVALID_ARGUMENT
    assert caught.value.message.startswith("tenant must be 1 to 64"), caught.value.message
    assert api.stats(sc.L1StatsRequest()).tenants == []  # nothing kept, nothing counted


async def test_entries_an_older_version_kept_under_such_names_load_and_are_served_to_none(
    tmp_path: Path,
) -> None:
    clock = ManualClock()
    store, wal = SnapshotStore(tmp_path), tmp_path / "wal"
    old = new_cache(clock)
    snapshotter = Snapshotter(store, clock, 0, WriteAheadLog(wal))
    await snapshotter.open(old)
    for tenant in (*BAD[:3], "acme"):  # the store under no check, as an older version did
        assert (await old.store(q("how do i reset my password", tenant), answer(b"x"))).stored
    await snapshotter.save()  # these in the snapshot, the next ones in the log only
    for tenant in (BAD[3], "globex"):
        assert (await old.store(q("what is the refund policy", tenant), answer(b"y"))).stored
    await snapshotter.stop()
    policies = tmp_path / "policies.json"
    await TenantPolicies(policies).set("a\x00b", PolicyChange(l1_enabled=False))

    revived = new_cache(clock)  # start-up: no crash
    await Snapshotter(store, clock, 0, WriteAheadLog(wal)).open(revived)
    assert len(revived) == 6
    api = SemanticCacheApi(revived, lease_wait_s=1.0, policies=TenantPolicies(policies))
    for tenant, question in (("acme", "how do i reset my password"), (BAD[3], "refund policy")):
        assert (await revived.check(q(question, tenant))).hit  # kept, as they were
    with pytest.raises(RequestError) as caught:
        await api.lookup(
            sc.LookupRequest(tenant="../..", request=make_request("how do i reset my password")),
            5.0,
        )
    assert caught.value.code == Code.INVALID_ARGUMENT
