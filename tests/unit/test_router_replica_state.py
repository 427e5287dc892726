"""The router's record of each replica's queue and measured prefill rate (replica_state)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.common.models import ModelSpec, load_model_table
from services.router.replica_state import (
    MIN_SAMPLE_TOKENS,
    ReplicaStates,
    lost_prefix_explains_stall,
)

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


def _measured_answer(states: ReplicaStates, slots: int | None) -> None:
    """An answer of 100 tokens decoded in 1 s after its first report: the typical one (its
    prefill, too short, gives no rate sample)."""
    ticket = states.sent("r", 1_000, 100, [], now=0.0, max_tokens=100, slots=slots)
    states.started("r", ticket, 1_000, 900, now=0.5)
    states.ended("r", ticket, now=1.5, output_tokens=100)


def test_a_call_decoding_on_a_one_slot_replica_occupies_it() -> None:
    """llama-server with one slot serves one request at a time: a warm turn sent while it
    decodes an answer starts when that answer ends, whatever the prefill queue says."""
    states = ReplicaStates()
    _measured_answer(states, slots=1)
    assert states.queued_s("r", 1_000.0, now=1.5) == 0.0  # idle
    long = states.sent("r", 1_000, 0, [], now=2.0, max_tokens=400, slots=1)
    states.started("r", long, 1_000, 1_000, now=2.1)
    # decoding for 0.5 s of the typical 1 s: 0.5 s left
    assert states.queued_s("r", 1_000.0, now=2.6) == pytest.approx(0.5)
    # 2 s, past the typical answer: as long again as it has run ...
    assert states.queued_s("r", 1_000.0, now=4.1) == pytest.approx(2.0)
    # ... up to its max_tokens at the measured pace (400 tokens: 4 s)
    assert states.queued_s("r", 1_000.0, now=5.6) == pytest.approx(0.5)
    # a request queued behind it: its 0.5 s prefill once the slot is free, then its decode
    # (at most 50 tokens: 0.5 s); one sent after that waits for both
    behind = states.sent("r", 1_000, 500, [], now=2.6, max_tokens=50, slots=1)
    assert states.queued_s("r", 1_000.0, now=2.6) == pytest.approx(0.5 + 0.5 + 0.5)
    # its prefill is timed from the slot's release, not from when it was sent
    states.ended("r", long, now=3.0, output_tokens=None)
    states.started("r", behind, 1_000, 500, now=3.5)
    assert states.rate("r", 1.0).prefill_tokens_per_s == pytest.approx(1_000.0)


def test_a_batching_replica_prefills_beside_its_decodes() -> None:
    """vLLM, SGLang, the simulator (no ``slots``): a decoding call delays no prefill."""
    states = ReplicaStates()
    _measured_answer(states, slots=None)
    long = states.sent("r", 1_000, 0, [], now=2.0, max_tokens=400)
    states.started("r", long, 1_000, 1_000, now=2.1)
    assert states.queued_s("r", 1_000.0, now=2.6) == 0.0
    behind = states.sent("r", 1_000, 500, [], now=2.6, max_tokens=50)
    assert states.queued_s("r", 1_000.0, now=2.6) == pytest.approx(0.5)
    states.started("r", behind, 1_000, 500, now=3.1)
    assert states.rate("r", 1.0).prefill_tokens_per_s == pytest.approx(1_000.0)


def test_a_one_slot_replica_with_no_answer_measured_counts_a_decode_as_long_again() -> None:
    states = ReplicaStates()
    ticket = states.sent("r", 1_000, 0, [], now=0.0, max_tokens=400, slots=1)
    states.started("r", ticket, 1_000, 1_000, now=1.0)
    assert states.queued_s("r", 1_000.0, now=3.0) == pytest.approx(2.0)
    states.ended("r", ticket, now=3.5, output_tokens=None)  # cut: no measure
    assert states.queued_s("r", 1_000.0, now=3.5) == 0.0
    assert states.loads() == {}


def test_replica_slots_is_a_self_hosted_rows_setting() -> None:
    table = load_model_table()
    assert table.models["local-small"].replica_slots == 1  # `up --local-engine`'s llama-server
    assert table.models["llama-3-1-8b-vllm"].replica_slots is None  # vLLM batches
    for model in ("sim-large", "claude-sonnet-4-5"):
        row = table.models[model].model_dump(exclude_unset=True)
        with pytest.raises(ValidationError, match="replica_slots is a self-hosted engine's"):
            ModelSpec.model_validate({**row, "replica_slots": 1})
    row = table.models["local-small"].model_dump(exclude_unset=True)
    with pytest.raises(ValidationError):
        ModelSpec.model_validate({**row, "replica_slots": 0})


def test_a_prefill_whose_caller_left_keeps_the_replica_busy_until_its_predicted_end() -> None:
    """llama-server runs a prompt's prefill to its end after its caller gave up: the replica
    is busy for the rest of it, not idle the moment the caller leaves."""
    states = ReplicaStates()
    ticket = states.sent("r", 3_000, 3_000, [A, B], now=0.0)  # 3 s at 1,000 tokens/s
    states.abandoned("r", ticket, 1_000.0, now=1.0)  # the caller leaves after 1 s
    assert states.loads() == {}  # the call is over for the router
    assert states.queued_s("r", 1_000.0, now=1.0) == pytest.approx(2.0)
    assert states.queued_s("r", 1_000.0, now=2.5) == pytest.approx(0.5)
    assert states.pending_match("r", [A, B, C], 48) == 0  # its prompt is not warm there
    assert states.queued_s("r", 1_000.0, now=3.0) == 0.0  # its predicted end: forgotten
    assert states.queued_requests("r") == 0
    # the next prefill began when it ended: 1,000 tokens in 1 s, not in 1.5
    ticket = states.sent("r", 1_000, 1_000, [], now=2.5)
    states.started("r", ticket, 1_000, 0, now=4.0)
    assert states.rate("r", 1.0).prefill_tokens_per_s == pytest.approx(1_000.0)


def test_a_left_prefill_ends_at_the_latest_with_the_first_report_of_one_after_it() -> None:
    states = ReplicaStates()
    left = states.sent("r", 3_000, 3_000, [], now=0.0)
    after = states.sent("r", 1_000, 1_000, [], now=0.0)
    states.abandoned("r", left, 1_000.0, now=0.0)
    assert states.queued_s("r", 1_000.0, now=0.0) == pytest.approx(4.0)  # both, in order
    states.started("r", after, 1_000, 0, now=2.0)  # sooner than predicted: it was dropped
    assert states.queued_s("r", 1_000.0, now=2.0) == 0.0 and states.queued_requests("r") == 0


def test_left_prefills_end_one_by_one() -> None:
    states = ReplicaStates()
    one = states.sent("r", 1_000, 1_000, [], now=0.0)  # ends at 1 s
    two = states.sent("r", 2_000, 2_000, [], now=0.0)  # then at 3 s
    states.abandoned("r", two, 1_000.0, now=0.0)
    states.abandoned("r", one, 1_000.0, now=0.0)
    assert states.queued_requests("r") == 2
    assert states.queued_s("r", 1_000.0, now=1.5) == pytest.approx(1.5)
    assert states.queued_requests("r") == 1
    assert states.queued_s("r", 1_000.0, now=3.0) == 0.0 and states.queued_requests("r") == 0


def _explains(rate: float, prompt: int, warm: int, queued_s: float = 0.0) -> bool:
    """``lost_prefix_explains_stall`` with the predictions the chooser makes at ``rate``
    (tokens/s) with ``queued_s`` of prefill ahead: warm (``warm`` tokens reused) and cold."""
    return lost_prefix_explains_stall(
        warm, prompt, queued_s + (prompt - warm) / rate, queued_s + prompt / rate
    )


def test_a_stall_is_laid_to_a_lost_prefix_only_where_a_cold_prefill_would_itself_stall() -> None:
    """Over half the prompt predicted warm is needed, not enough: the stall bound's floor (1 s)
    and the queue ahead count too. On a fast engine a lost prefix cannot cause a stall (8,000
    tokens/s, 3,600 of 4,000 warm: a cold prefill 0.50 s against a bound of 1.10 s), and the
    replica was named all the same, its blocks evicted from prefix-cache's view; on the
    restart test's CPU engine (140 tokens/s, 288 of 340 warm) a cold prefill takes 2.43 s
    against 1.74 s: named."""
    assert not _explains(8_000.0, 4_000, 3_600)
    assert not _explains(8_000.0, 2_000, 1_900)
    assert _explains(140.0, 340, 288)
    assert not _explains(140.0, 340, 288, queued_s=1.0)  # 3.43 s cold, bound 3.74 s
    assert _explains(1_000.0, 10_000, 9_000)  # 10 s cold, bound 3 s
    assert not _explains(1.0, 2_000, 1_000)  # half, not over: 2,000 s cold, bound 2,001 s
    assert not _explains(1_000.0, 2_000, 0)  # nothing predicted warm: nothing lost


def test_a_stalled_call_bounds_the_replicas_rate_by_what_it_showed() -> None:
    """A call handed over with no first report 10 s after its prefill could begin: that
    replica prefills at most 2,000 tokens in 10 s, whatever its prior or an idle-time sample
    said, so its next call is given the time that rate needs instead of stalling again."""
    states = ReplicaStates()
    ticket = states.sent("r", 2_000, 2_000, [], now=0.0)
    states.stalled("r", ticket, now=10.0)
    assert states.rate("r", 150_000.0).prefill_tokens_per_s == 200.0  # the prior corrected
    ticket = states.sent("q", 10_000, 10_000, [], now=0.0)
    states.started("q", ticket, 10_000, 0, now=1.0)  # measured 10,000 tokens/s
    ticket = states.sent("q", 4_000, 4_000, [], now=1.0)
    states.stalled("q", ticket, now=21.0)
    assert states.rate("q", 1.0).prefill_tokens_per_s == 200.0  # 4,000 in more than 20 s
    ticket = states.sent("q", 4_000, 4_000, [], now=30.0)
    states.stalled("q", ticket, now=31.0)  # a bound above the rate: nothing to correct
    assert states.rate("q", 1.0).prefill_tokens_per_s == 200.0
    ticket = states.sent("s", 100, 100, [], now=0.0)
    states.stalled("s", ticket, now=10.0)  # too short a prompt for a rate
    assert states.rate("s", 9_000.0).samples == 0


def test_a_replica_is_overdue_while_its_oldest_call_outlasts_its_prefill_unheard() -> None:
    """``overdue``: the oldest call waiting there past its predicted prefill with no sign of
    life since it began (a call handed over there would wait as long); not once the replica
    shows life, nor for a prefill whose caller left once it is predicted done."""
    states = ReplicaStates()
    assert not states.overdue("r", 1_000.0, now=0.0)  # nothing known: not overdue
    ticket = states.sent("r", 1_000, 1_000, [], now=0.0)
    assert not states.overdue("r", 1_000.0, now=0.9)  # within its predicted 1 s
    assert states.overdue("r", 1_000.0, now=1.1)
    states.progressed("r", now=1.2)  # a token on another call: alive, busy
    assert not states.overdue("r", 1_000.0, now=1.3)
    states.failed("r", ticket)
    left = states.sent("r", 1_000, 1_000, [], now=2.0)
    states.abandoned("r", left, 1_000.0, now=2.0)  # its engine prefills it until 3.0
    assert states.overdue("r", 1_000.0, now=2.0 + 1.0 + 1e-6) is False  # predicted done
