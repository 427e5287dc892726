"""What each tenant holds of a shared bound, and which tenant holds the most."""

from __future__ import annotations

import pytest

from services.common.holdings import Holdings


def test_the_tenant_holding_the_most_follows_every_change() -> None:
    holdings = Holdings()
    holdings.add("a", 3)
    holdings.add("b", 5)
    assert holdings.most() == "b"
    holdings.add("b", -4)  # b's stale amount in the heap is skipped
    assert holdings.most() == "a" and holdings.held("b") == 1
    holdings.add("a", -3)
    assert holdings.most() == "b" and holdings.held("a") == 0
    holdings.add("b", -1)
    with pytest.raises(LookupError):
        holdings.most()


def test_stale_items_are_dropped_and_the_answer_stays_right() -> None:
    holdings = Holdings()
    for i in range(1000):  # many changes over three tenants: the heap is rebuilt
        holdings.add("a", 1)
        holdings.add("b", 2)
        holdings.add("c", 3 if i < 500 else -3)
    assert len(holdings._heap) <= 2 * 2 + 64 + 1
    assert holdings.held("c") == 0 and holdings.most() == "b"
    holdings.add("a", 1001)
    assert holdings.most() == "a"


def test_a_tenant_cannot_hold_less_than_nothing() -> None:
    holdings = Holdings()
    holdings.add("a", 1)
    with pytest.raises(ValueError, match="less than nothing"):
        holdings.add("a", -2)
