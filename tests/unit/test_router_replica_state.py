"""The router's record of each replica's queue and measured prefill rate (replica_state)."""

from __future__ import annotations

import pytest

from services.router.replica_state import MIN_SAMPLE_TOKENS, ReplicaStates

A, B, C = b"a" * 32, b"b" * 32, b"c" * 32


def test_the_rate_is_measured_from_first_reports_not_assumed() -> None:
    states = ReplicaStates()
    assert states.rate("r", 9_000.0).prefill_tokens_per_s == 9_000.0  # the prior, 0 samples
    ticket = states.sent("r", 10_000, 10_000, [], now=0.0)
    states.started("r", ticket, 10_000, 2_000, now=2.0)  # 8,000 prefilled in 2 s
    rate = states.rate("r", 9_000.0)
    assert (rate.prefill_tokens_per_s, rate.samples) == (4_000.0, 1)


def test_a_replica_that_reports_no_reuse_at_its_start_is_timed_on_the_predicted_prefill() -> None:
    """A provider adapter (llama-server behind the OpenAI API) learns the engine's KV reuse
    only at the end: a warm turn of 1,000 tokens, 800 predicted warm, took 1 s to its first
    token. It prefilled about 200 tokens in that second, not 1,000."""
    states = ReplicaStates()
    ticket = states.sent("r", 1_000, 200, [], now=0.0)
    states.started("r", ticket, 1_000, None, now=1.0)
    assert states.rate("r", 9_000.0).samples == 0  # 200 prefilled: under the sample's minimum
    ticket = states.sent("r", 2_000, 400, [], now=2.0)
    states.started("r", ticket, 2_000, None, now=4.0)
    assert states.rate("r", 9_000.0).prefill_tokens_per_s == 200.0  # 400 in 2 s, not 2,000


def test_a_queued_request_is_timed_from_the_previous_first_report() -> None:
    """FIFO: the second prefill began when the first one ended, not when it was sent."""
    states = ReplicaStates()
    first = states.sent("r", 4_000, 4_000, [], now=0.0)
    second = states.sent("r", 4_000, 4_000, [], now=0.0)
    states.started("r", first, 4_000, 0, now=1.0)
    states.started("r", second, 4_000, 0, now=3.0)  # 4,000 in 2 s, not in 3 s
    # weighted sums: 4,000 tokens over 1 s + 0.2 x (2 s - 1 s)
    assert states.rate("r", 1.0).prefill_tokens_per_s == pytest.approx(4_000 / 1.2)


def test_tiny_prefills_give_no_rate_sample() -> None:
    states = ReplicaStates()
    ticket = states.sent("r", MIN_SAMPLE_TOKENS, MIN_SAMPLE_TOKENS - 1, [], now=0.0)
    states.started("r", ticket, MIN_SAMPLE_TOKENS, 1, now=0.5)
    assert states.rate("r", 7.0).samples == 0


def test_queued_prefill_counts_what_the_head_has_already_done() -> None:
    states = ReplicaStates()
    states.sent("r", 2_000, 1_000, [], now=0.0)  # 1 s at 1,000 tokens/s
    states.sent("r", 3_000, 3_000, [], now=0.0)  # 3 s
    assert states.queued_s("r", 1_000.0, now=0.0) == pytest.approx(4.0)
    assert states.queued_s("r", 1_000.0, now=0.5) == pytest.approx(3.5)
    assert states.queued_s("r", 1_000.0, now=2.0) == pytest.approx(3.0)  # head overran: rest
    assert states.queued_s("other", 1_000.0, now=0.0) == 0.0


def test_queued_prompts_count_as_warm_until_their_first_report() -> None:
    states = ReplicaStates()
    ticket = states.sent("r", 48, 48, [A, B, C], now=0.0)
    # a prompt starting with the same two blocks: both count (never the last token's block)
    assert states.pending_match("r", [A, B, b"x" * 32], 48) == 32
    assert states.pending_match("r", [A, B, C], 49) == 48
    assert states.pending_match("r", [b"x" * 32, A], 48) == 0  # the first block must match
    assert states.pending_match("other", [A], 32) == 0
    states.started("r", ticket, 48, 0, now=0.1)
    assert states.pending_match("r", [A, B, C], 49) == 0  # prefix-cache's view has it now


def test_in_flight_counts_and_failures() -> None:
    states = ReplicaStates()
    one = states.sent("r", 100, 100, [A], now=0.0)
    two = states.sent("r", 100, 100, [A], now=0.0)
    assert states.loads() == {"r": 2}
    states.failed("r", one)  # failed before its first report: forgotten and released
    assert states.loads() == {"r": 1} and states.pending_match("r", [A, B], 33) == 16
    states.started("r", two, 100, 0, now=1.0)
    states.failed("r", two)  # already started: the pipeline's release ends it, not this
    assert states.loads() == {"r": 1}
    states.release("r")
    states.release("r")  # never below zero
    assert states.loads() == {}


def test_a_request_far_past_its_predicted_prefill_is_a_stall_not_done() -> None:
    """A hung replica must not look idle: its head, waiting for its first report well past
    twice its predicted prefill plus 1 s, occupies it for as long again as it overran that."""
    states = ReplicaStates()
    states.sent("r", 1_000, 1_000, [], now=0.0)  # 1 s at 1,000 tokens/s
    assert states.queued_s("r", 1_000.0, now=3.0) == 0.0  # 2 x 1 s + 1 s: not yet
    assert states.queued_s("r", 1_000.0, now=13.0) == pytest.approx(10.0)
    assert states.queued_s("r", 1_000.0, now=103.0) == pytest.approx(100.0)
