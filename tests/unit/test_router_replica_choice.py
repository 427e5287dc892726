"""The replica policies: predicted TTFT (queue + uncached prefill at the measured rate) with
affinity on near-ties and replication of a hot prefix; SGLang's rule and round robin."""

from __future__ import annotations

import pytest

from services.router.replica_choice import (
    REASONS,
    ChoiceSettings,
    ReplicaChooser,
    Request,
    TtftPolicy,
)
from services.router.replica_state import ReplicaStates

RATE = 10_000.0  # tokens/s, the model table's prior here


def _chooser(policy: str = "ttft") -> ReplicaChooser:
    return ReplicaChooser(ChoiceSettings(policy=policy), ReplicaStates())


def _request(prompt: int, hashes: list[bytes] | None = None) -> Request:
    return Request("m", prompt, hashes or [], RATE)


def test_the_warm_replica_wins_when_queues_are_equal() -> None:
    route = _chooser().choose(_request(10_000), ["a", "b"], {"b": 8_000}, now=0.0)
    assert (route.order, route.reason, route.match_tokens) == (("b", "a"), "ttft_warm", 8_000)
    assert route.predicted_ttft_s == pytest.approx(0.2) and route.queued_s == 0.0


def test_a_long_queue_on_the_warm_replica_replicates_the_prefix() -> None:
    chooser = _chooser()
    chooser.states.sent("b", 30_000, 30_000, [], now=0.0)  # 3 s of prefill queued on b
    route = chooser.choose(_request(10_000), ["a", "b"], {"b": 8_000}, now=0.0)
    # a: 0 + 1.0 s; b: 3 s + 0.2 s -> a, which prefills the prefix again
    assert (route.order[0], route.reason) == ("a", "replicate_prefix")
    assert route.predicted_ttft_s == pytest.approx(1.0)


def test_affinity_breaks_a_near_tie() -> None:
    chooser = ReplicaChooser(
        ChoiceSettings(ttft=TtftPolicy(tie_fraction=0.1, tie_floor_s=0.0, work_weight=0.0)),
        ReplicaStates(),
    )
    chooser.states.sent("b", 10_500, 10_500, [], now=0.0)  # 1.05 s queued on b
    # a: 1.0 s (nothing warm); b: 1.05 + 0.0 -> within 10% of the fastest: b keeps its prefix
    route = chooser.choose(_request(10_000), ["a", "b"], {"b": 9_984}, now=0.0)
    assert (route.order[0], route.reason) == ("b", "affinity_tie")
    # beyond the tie: a
    chooser.states.sent("b", 2_000, 2_000, [], now=0.0)
    assert chooser.choose(_request(10_000), ["a", "b"], {"b": 9_984}, now=0.0).order[0] == "a"


def test_a_cold_prompt_goes_where_it_starts_soonest() -> None:
    chooser = _chooser()
    chooser.states.sent("a", 5_000, 5_000, [], now=0.0)
    route = chooser.choose(_request(10_000), ["a", "b"], {}, now=0.0)
    assert (route.order, route.reason) == (("b", "a"), "ttft_cold")


def test_the_measured_rate_replaces_the_prior() -> None:
    chooser = _chooser()
    ticket = chooser.states.sent("a", 10_000, 10_000, [], now=0.0)
    chooser.states.started("a", ticket, 10_000, 0, now=10.0)  # a is slow: 1,000 tokens/s
    chooser.states.release("a")
    route = chooser.choose(_request(10_000), ["a", "b"], {"a": 5_000}, now=20.0)
    # a: 5,000 / 1,000 = 5 s; b: 10,000 at the prior 10,000/s = 1 s
    assert (route.order[0], route.reason) == ("b", "replicate_prefix")


def test_a_prompt_queued_there_counts_as_warm() -> None:
    chooser = _chooser()
    blocks = [bytes([i]) * 32 for i in range(100)]
    chooser.states.sent("b", 1_600, 1_600, blocks, now=0.0)
    route = chooser.choose(_request(1_601, blocks), ["a", "b"], {}, now=0.0)
    assert (route.order[0], route.match_tokens) == ("b", 1_600)


def test_sglang_and_round_robin_stay_selectable() -> None:
    sglang = _chooser("sglang")
    route = sglang.choose(_request(1_000), ["a", "b"], {"b": 800}, now=0.0)
    assert (route.order[0], route.reason) == ("b", "cache_affinity")
    robin = _chooser("round_robin")
    firsts = [robin.choose(_request(1_000), ["a", "b"], {"b": 800}, 0.0) for _ in range(4)]
    assert [r.order[0] for r in firsts] == ["a", "b", "a", "b"]
    assert {r.reason for r in firsts} == {"round_robin"}


def test_every_reason_is_declared_and_the_policy_validated() -> None:
    assert set(REASONS) == {"ttft", "sglang", "round_robin"}
    with pytest.raises(ValueError, match="policy must be one of"):
        ChoiceSettings(policy="fastest")
    with pytest.raises(ValueError, match="no replica"):
        _chooser().choose(_request(1), [], {}, 0.0)
