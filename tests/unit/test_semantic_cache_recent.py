"""The recent values by tenant: one bound, shared fairly between tenants."""

from __future__ import annotations

from services.semantic_cache.recent import TenantRecent


def test_the_tenant_holding_the_most_loses_its_least_recently_used() -> None:
    recent: TenantRecent[str, int] = TenantRecent(4)
    for i in range(4):
        recent.put("a", f"a{i}", i)  # alone, a has the whole bound
    assert recent.get("a", "a0") == 0  # a0 is now a's most recently used
    for i in range(10):
        recent.put("b", f"b{i}", i)
    assert len(recent) == 4
    assert [recent.get("a", f"a{i}") for i in range(4)] == [0, None, None, 3]
    assert recent.get("b", "b9") == 9 and recent.get("b", "b7") is None
    assert recent.get("b", "a0") is None  # by tenant: a's key is not b's


def test_a_size_of_zero_keeps_nothing() -> None:
    recent: TenantRecent[str, int] = TenantRecent(0)
    recent.put("a", "k", 1)
    assert len(recent) == 0 and recent.get("a", "k") is None
