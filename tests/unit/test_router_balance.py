"""SGLang's cache-aware rule (https://docs.sglang.ai/advanced_features/router.html): imbalanced
when max - min load > abs threshold AND max > rel threshold x min -> shortest queue; else the
longest warm prefix when it covers more than cache_threshold of the prompt; else least loaded."""

from __future__ import annotations

from services.router.balance import BalancePolicy, choose, is_imbalanced

SGLANG = BalancePolicy()  # abs 64, rel 1.5, cache 0.3


def test_sglang_defaults() -> None:
    assert (SGLANG.abs_threshold, SGLANG.rel_threshold, SGLANG.cache_threshold) == (64, 1.5, 0.3)


def test_imbalance_needs_both_the_absolute_and_the_relative_gap() -> None:
    assert is_imbalanced([70, 5], SGLANG)  # 65 > 64 and 70 > 7.5
    assert not is_imbalanced([69, 5], SGLANG)  # 64 is not > 64
    assert not is_imbalanced([200, 135], SGLANG)  # 65 > 64 but 200 < 202.5
    assert is_imbalanced([210, 135], SGLANG)


def test_affinity_when_balanced_and_the_match_is_long() -> None:
    route = choose([("a", 800), ("b", 0)], {"a": 60, "b": 0}, 1000, SGLANG)
    assert (route.order, route.reason, route.match_tokens, route.load) == (
        ("a", "b"),
        "cache_affinity",
        800,
        60,
    )


def test_shortest_queue_when_affinity_would_build_a_hotspot() -> None:
    route = choose([("a", 800), ("b", 0)], {"a": 70, "b": 5}, 1000, SGLANG)
    assert (route.order, route.reason, route.match_tokens) == (("b", "a"), "shortest_queue", 0)


def test_least_loaded_when_no_replica_holds_enough_of_the_prompt() -> None:
    route = choose([("a", 300), ("b", 0)], {"a": 3, "b": 1}, 1000, SGLANG)  # 0.3 is not > 0.3
    assert (route.order[0], route.reason) == ("b", "least_loaded")


def test_ties_in_match_go_to_the_less_loaded_replica() -> None:
    route = choose([("a", 900), ("b", 900)], {"a": 2, "b": 1}, 1000, SGLANG)
    assert route.order == ("b", "a") and route.reason == "cache_affinity"
