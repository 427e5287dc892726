"""The TTFT policy's eviction model (a warm prefix counts only if the replica will still hold it
when the request runs) and its weight on the prefill a choice adds for the requests behind."""

from __future__ import annotations

import pytest

from services.common.kv_blocks import BLOCK_SIZE, KvBlockCache, block_hashes
from services.router.replica_choice import ChoiceSettings, ReplicaChooser, Request, TtftPolicy
from services.router.replica_state import ReplicaStates

RATE = 10_000.0
BLOCKS = [bytes([i]) * 16 for i in range(8)]  # a prompt of 8 blocks (128 tokens) and one more
OTHER = [bytes([100 + i]) * 16 for i in range(8)]
FILL = [bytes([200]) * 16]


def _seen_a_whole_capacity(states: ReplicaStates, replica: str) -> None:
    """The router records 1,000 new tokens prefilled on ``replica``: its record reaches back
    a whole capacity, so what it did not see there is evicted."""
    ticket = states.sent(replica, 1_000, 1_000, FILL, now=0.0)
    states.started(replica, ticket, 1_000, 0, now=0.0)


def test_a_prefilled_prompt_stays_warm_until_the_capacity_is_prefilled_after_it() -> None:
    states = ReplicaStates(kv_capacity_tokens=1_000)
    _seen_a_whole_capacity(states, "r")
    ticket = states.sent("r", 129, 129, BLOCKS, now=0.0)
    states.started("r", ticket, 129, 0, now=1.0)
    assert states.surviving_match("r", BLOCKS, 129) == (0, 128)
    # 900 new tokens after it (56 blocks): the cache's 62 blocks keep its head, not its two
    # tail blocks (touched first: 8 + 56 blocks is 2 more than it holds)
    ticket = states.sent("r", 900, 900, OTHER, now=1.0)
    assert states.surviving_match("r", BLOCKS, 129) == (0, 96)
    states.started("r", ticket, 900, 0, now=2.0)
    assert states.surviving_match("r", BLOCKS, 129) == (0, 96)
    # 200 more queued ahead of the request: by the time it runs, evicted
    states.sent("r", 200, 200, [], now=2.0)
    assert states.surviving_match("r", BLOCKS, 129) == (0, 0)
    # without a capacity nothing is known to be evicted
    assert ReplicaStates().surviving_match("r", BLOCKS, 129) == (0, 129)


def test_a_queued_prompt_counts_only_while_less_than_the_capacity_is_queued_after_it() -> None:
    states = ReplicaStates(kv_capacity_tokens=1_000)
    _seen_a_whole_capacity(states, "r")
    states.sent("r", 129, 129, BLOCKS, now=0.0)
    assert states.surviving_match("r", BLOCKS, 129) == (128, 0)
    states.sent("r", 1_000, 1_000, OTHER, now=0.0)  # its blocks evict the first prompt's
    assert states.surviving_match("r", BLOCKS, 129) == (0, 0)


def test_the_view_is_capped_by_what_the_replica_still_holds() -> None:
    states = ReplicaStates(kv_capacity_tokens=1_000)
    chooser = ReplicaChooser(ChoiceSettings(ttft=TtftPolicy(kv_capacity_tokens=1_000)), states)
    request = Request("m", 129, BLOCKS, RATE)
    ticket = states.sent("b", 129, 129, BLOCKS, now=0.0)
    states.started("b", ticket, 129, 0, now=0.1)
    route = chooser.choose(request, ["a", "b"], {"b": 128}, now=1.0)
    assert (route.order[0], route.match_tokens, route.reason) == ("b", 128, "ttft_warm")
    # b prefilled 1,000 new tokens since: the view still says warm, the model says evicted
    ticket = states.sent("b", 1_000, 1_000, OTHER, now=1.0)
    states.started("b", ticket, 1_000, 0, now=1.1)
    route = chooser.choose(request, ["a", "b"], {"b": 128}, now=2.0)
    assert (route.match_tokens, route.reason) == (0, "ttft_cold")


def test_before_its_record_reaches_back_a_capacity_the_router_trusts_the_view() -> None:
    """After a restart the router has seen nothing prefilled: the prefixes prefix-cache's view
    names warm were prefilled before, and count until a whole capacity is prefilled after."""
    states = ReplicaStates(kv_capacity_tokens=1_000)
    chooser = ReplicaChooser(ChoiceSettings(ttft=TtftPolicy(kv_capacity_tokens=1_000)), states)
    request = Request("m", 129, BLOCKS, RATE)
    assert states.surviving_match("b", BLOCKS, 129) == (0, None)
    route = chooser.choose(request, ["a", "b"], {"b": 128}, now=0.0)
    assert (route.order[0], route.match_tokens, route.reason) == ("b", 128, "ttft_warm")
    ticket = states.sent("b", 600, 600, OTHER, now=0.0)
    states.started("b", ticket, 600, 0, now=0.1)
    assert states.surviving_match("b", BLOCKS, 129) == (0, None)  # 600 < 1,000 seen
    states.sent("b", 400, 400, [], now=0.1)  # with the queue ahead, a whole capacity
    assert states.surviving_match("b", BLOCKS, 129) == (0, 0)
    route = chooser.choose(request, ["a", "b"], {"b": 128}, now=0.2)
    assert route.match_tokens == 0


@pytest.mark.parametrize(
    ("weight", "chosen", "reason"), [(1.0, "b", "save_work"), (0.0, "a", "replicate_prefix")]
)
def test_a_busy_system_counts_the_prefill_a_choice_adds_for_the_requests_behind_it(
    weight: float, chosen: str, reason: str
) -> None:
    chooser = ReplicaChooser(
        ChoiceSettings(ttft=TtftPolicy(work_weight=weight, tie_floor_s=0.0)), ReplicaStates()
    )
    for _ in range(2):  # two requests queued on each: 0.2 s on a, 1.7 s on b
        chooser.states.sent("a", 1_000, 1_000, [], now=0.0)
        chooser.states.sent("b", 8_500, 8_500, [], now=0.0)
    route = chooser.choose(Request("m", 10_000, [], RATE), ["a", "b"], {"b": 9_000}, now=0.0)
    # TTFT: a 0.2 + 1.0 = 1.2 s, b 1.7 + 0.1 = 1.8 s; with the two requests that will wait
    # behind it (the mean queue's length) a's prefill costs 1.2 + 2 * 1.0 = 3.2 s, b's
    # 1.8 + 2 * 0.1 = 2.0 s: b keeps its prefix; greedy (weight 0) replicates it on a
    assert (route.order[0], route.reason) == (chosen, reason)


def test_a_short_queue_weighs_the_added_prefill_little() -> None:
    chooser = ReplicaChooser(ChoiceSettings(ttft=TtftPolicy(tie_floor_s=0.0)), ReplicaStates())
    chooser.states.sent("b", 17_000, 17_000, [], now=0.0)  # 1.7 s on b, nothing on a
    route = chooser.choose(Request("m", 10_000, [], RATE), ["a", "b"], {"b": 9_000}, now=0.0)
    # half a request queued per replica: a 1.0 + 0.5 * 1.0 = 1.5 s, b 1.8 + 0.5 * 0.1 = 1.85
    assert (route.order[0], route.reason) == ("a", "replicate_prefix")


def test_the_model_remembers_at_most_a_capacity_of_blocks_and_answers_by_the_prefix() -> None:
    """A long-running router: its record stays a capacity's blocks whatever the traffic, and a
    prompt sharing a long prefix with thousands of earlier ones is answered block by block."""
    states = ReplicaStates(kv_capacity_tokens=1_600)  # 100 blocks
    shared = [bytes([1, i]) * 8 for i in range(40)]
    for n in range(500):
        own = [n.to_bytes(4, "big") + bytes([2, i]) * 6 for i in range(4)]
        ticket = states.sent("r", 44 * 16, 4 * 16, shared + own, now=float(n))
        states.started("r", ticket, 44 * 16, 40 * 16, now=float(n))
    assert states.tracked_blocks("r") <= 100 + 44
    asked = [*shared, b"new block".ljust(16, b".")]
    assert states.surviving_match("r", asked, len(asked) * 16 + 1) == (0, 40 * 16)


@pytest.mark.parametrize("capacity", [-1, 0, 1, 15])
def test_a_capacity_below_one_block_is_refused_in_code_as_by_the_setting(capacity: int) -> None:
    """ROUTER_KV_CAPACITY_TOKENS refuses below one 16-token block; the pieces did not: a
    15-token cache counted a prefilled 32-token prefix as held, a 0-token one no queued prompt
    (no caller passes one now; the model and the policy refuse it as the setting does)."""
    with pytest.raises(ValueError, match="at least 16"):
        ReplicaStates(kv_capacity_tokens=capacity)
    with pytest.raises(ValueError, match="at least 16"):
        TtftPolicy(kv_capacity_tokens=capacity)


def test_one_block_of_capacity_or_none_is_taken() -> None:
    assert ReplicaStates(kv_capacity_tokens=16).kv_capacity_tokens == 16
    assert ReplicaStates().kv_capacity_tokens is None
    assert TtftPolicy(kv_capacity_tokens=16).kv_capacity_tokens == 16


def _engine_and_model(
    capacity_blocks: int, prompts: list[list[int]]
) -> list[tuple[int, int | None]]:
    """Each prompt prefilled in turn on the engine's LRU cache (``KvBlockCache``) and told to
    the router's model as the replica reports it; after each, (the engine's reuse of the first
    prompt, the model's held prefix of it)."""
    engine = KvBlockCache(capacity_blocks)
    states = ReplicaStates(kv_capacity_tokens=capacity_blocks * BLOCK_SIZE)
    first = block_hashes("t", "m", prompts[0])
    seen = []
    for at, ids in enumerate(prompts):
        hashes = block_hashes("t", "m", ids)
        cached = engine.cached_tokens(hashes, len(ids))
        ticket = states.sent("r", len(ids), len(ids) - cached, hashes, now=float(at))
        states.started("r", ticket, len(ids), cached, now=at + 0.5)
        engine.insert(hashes)
        _, held = states.surviving_match("r", first, len(prompts[0]))
        seen.append((engine.cached_tokens(first, len(prompts[0])), held))
    return seen


def test_the_model_evicts_a_prompts_tail_first_as_the_engine_does() -> None:
    """A 4-block cache, a 4-block prompt, then a 2-block one: the engine keeps the first
    prompt's 2 head blocks (its tail was touched first); the model counted all 4 held (the
    prompt's own blocks after each one were not counted: 64 tokens against the engine's 32)."""
    seen = _engine_and_model(4, [list(range(65)), list(range(1000, 1033))])
    assert seen == [(64, 64), (32, 32)]


def test_a_partial_last_block_evicts_nothing_in_the_model_as_in_the_engine() -> None:
    """A 4-block cache, a 2-block prompt, then prompts of one block and 15 tokens more: the
    engine writes one block for each (the partial one is not cached), so the first prompt's
    head outlives three of them; the model counted their 31 tokens each and had it evicted
    (0 against the engine's 16)."""
    prompts = [list(range(33))] + [list(range(1000 * n, 1000 * n + 31)) for n in (1, 2, 3)]
    seen = _engine_and_model(4, prompts)
    assert seen == [(32, None), (32, None), (32, 32), (16, 16)]


@pytest.mark.parametrize("uncached", [1_000, 988])
def test_a_prefill_whose_caller_left_still_evicts_in_the_model(uncached: int) -> None:
    """The engine prefills a prompt whose caller left all the same (``abandoned``): its blocks
    still push the first prompt's tail out (8 + 62 blocks in a 64-block cache: 2 held), as
    many as while its caller waited, whatever its predicted reuse (988 of 1,000 tokens
    uncached, 12 reused: the prompt's 62 whole blocks are written all the same; the model
    counted 61 once its caller left, the whole blocks of 988, and held 3)."""
    states = ReplicaStates(kv_capacity_tokens=64 * BLOCK_SIZE)
    ticket = states.sent("r", 129, 129, BLOCKS, now=0.0)
    states.started("r", ticket, 129, 0, now=0.1)
    other = [bytes([150 + i]) * 16 for i in range(62)]
    left = states.sent("r", 1_000, uncached, other, now=0.2)
    assert states.surviving_match("r", BLOCKS, 129) == (0, 32)
    states.abandoned("r", left, RATE, now=0.25)
    assert states.surviving_match("r", BLOCKS, 129) == (0, 32)
