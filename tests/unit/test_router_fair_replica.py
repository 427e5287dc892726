"""What the router records of a replica whose queue is tenant-fair (``services/model/
fair_queue.py``): first reports no longer come in the order the router sent the calls (a light
tenant's prompt overtakes a flood's), but one prefill still runs at a time, so each still began
at the previous first report: the measured rate and the queued work stay true."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest

from cachemesh import build_request
from services.common.models import load_model_table
from services.common.tokens import load_cl100k
from services.model.fair_queue import FairQueue
from services.router.balance import Route
from services.router.dispatch import expects_fair_queue
from services.router.replica_choice import ChoiceSettings, ReplicaChooser, Request
from services.router.replica_state import ReplicaStates
from tests.unit import test_model_engine_fair as engine_fair
from tests.unit.model_support import VirtualTime
from tests.unit.test_model_engine_fair import Waits, _first, _prompt
from tests.unit.test_router_replica_ejection import Clock, Models, _pipeline
from tests.unit.virtual_loop import run_on_clock
from tests.waits import reached

RATE = 1_000.0  # tokens a second: the replica's true prefill rate


def test_an_overtaking_first_report_keeps_the_rate_and_the_queue_true() -> None:
    states = ReplicaStates()
    flood = [states.sent("r", 2_000, 2_000, [], now=0.0) for _ in range(3)]  # tenant b
    light = states.sent("r", 500, 500, [], now=0.5)  # tenant a, sent during b's first prefill
    # queued work: every call without its first report, whatever order the replica takes
    assert states.queued_s("r", RATE, now=0.5) == pytest.approx(1.5 + 4.0 + 0.5)
    states.started("r", flood[0], 2_000, 0, now=2.0)
    states.started("r", light, 500, 0, now=2.5)  # the fair queue's next: a's, not b's second
    assert states.queued_s("r", RATE, now=2.5) == pytest.approx(4.0)
    states.started("r", flood[1], 2_000, 0, now=4.5)
    states.started("r", flood[2], 2_000, 0, now=6.5)
    rate = states.rate("r", 1.0)
    assert rate.samples == 4
    assert rate.prefill_tokens_per_s == pytest.approx(RATE)  # each timed from the report before
    assert states.queued_s("r", RATE, now=6.5) == 0.0


# -- the queue ahead of a request, as the replica's fair queue serves it ------------------------


async def _fair_order(calls: list[tuple[str, int]]) -> list[int]:
    """The order in which the model replica's own fair queue (one call at the engine at a time)
    serves ``calls`` sent in that order (the first at once, the rest waiting), by index."""
    queue = FairQueue(1, lambda: 0.0)
    served: list[int] = []

    async def call(i: int, tenant: str, cost: int) -> None:
        await queue.acquire(tenant, cost)
        served.append(i)

    tasks = []
    for i, (tenant, cost) in enumerate(calls):
        tasks.append(asyncio.ensure_future(call(i, tenant, cost)))
        await _settle()
    for _ in calls:
        queue.release()
        await _settle()
    await asyncio.gather(*tasks)
    return served


async def _settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)  # the calls run up to their next wait; no time passes


async def test_a_light_tenant_keeps_its_warm_replica_under_another_tenant_s_flood() -> None:
    """Tenant a floods r1 with eight cold 8,000-token prompts; tenant b's session prefix
    (9,600 of its 10,000 tokens) is warm on r1, r2 is idle. r1's fair queue gives b's call
    the turn after a's prefill in progress: its first token 0.34 s after it arrives, against
    1.0 s on r2 for a 10,000-token prefill (and, on a hosted provider, a new cache write).
    Counting all of a's queue predicted 5.94 s on r1 and sent b to r2."""
    rate, flood, arrives = 10_000.0, [("a", 8_000)] * 8, 0.5
    chooser = ReplicaChooser(ChoiceSettings(), ReplicaStates())
    for tenant, tokens in flood:
        chooser.states.sent("r1", tokens, tokens, [], now=0.0, tenant=tenant, fair_queue=True)
    wanted = Request("m", 10_000, [], rate, tenant="b")
    route = chooser.choose(wanted, ["r1", "r2"], {"r1": 9_600}, now=arrives)
    # the real fair queue: b's call, sent during a's first prefill, and its turn
    served = await _fair_order([*flood, ("b", 400)])
    ahead = served[: served.index(len(flood))]
    first_token_s = sum(flood[i][1] for i in ahead) / rate - arrives + 400 / rate
    assert ahead == [0] and first_token_s == pytest.approx(0.34)
    assert (route.order[0], route.reason) == ("r1", "ttft_warm")
    assert route.predicted_ttft_s == pytest.approx(first_token_s)
    assert route.queued_s == pytest.approx(0.3)
    # a's own next request still waits behind all of a's queue
    own = chooser.predicted_ttft_s(replace(wanted, tenant="a"), "r1", 9_600, arrives)
    assert own == pytest.approx(8 * 0.8 - arrives + 0.04)


@pytest.mark.parametrize("slots", [None, 1])
async def test_the_queue_ahead_is_what_the_fair_queue_serves_first(slots: int | None) -> None:
    """Random mixes of three tenants' calls queued on a replica (the first in progress) and one
    more call of any tenant: the prefill the router predicts ahead of it is the prefill of the
    calls the model replica's fair queue serves before it, exactly (its deficits start from
    none here, as the router assumes). Where the engine batches, a call's turn costs its
    uncached tokens (the simulator's queue); where it serves a few at a time, its prompt
    tokens (the provider adapter's gate)."""
    rng = random.Random(7)
    sizes = (16, 100, 300, 1_000, 2_500)
    for _ in range(150):
        calls = [(rng.choice("abc"), rng.choice(sizes)) for _ in range(rng.randint(1, 12))]
        prompts = [tokens for _, tokens in calls]
        uncached = prompts if slots is None else [rng.randint(0, t) for t in prompts]
        new_tenant, new_prompt = rng.choice("abcd"), rng.choice(sizes)
        costs = uncached if slots is None else prompts
        served = await _fair_order(
            [(t, c) for (t, _), c in zip(calls, costs, strict=True)] + [(new_tenant, new_prompt)]
        )
        ahead = sum(uncached[i] for i in served[: served.index(len(calls))])
        states = ReplicaStates()
        for (tenant, prompt), own in zip(calls, uncached, strict=True):
            states.sent("r", prompt, own, [], now=0.0, slots=slots, tenant=tenant, fair_queue=True)
        queued = states.queued_s(
            "r", RATE, 0.0, tenant=new_tenant, prompt_tokens=new_prompt, uncached_tokens=new_prompt
        )
        assert queued * RATE == pytest.approx(ahead), (calls, uncached, new_tenant, new_prompt)


def test_one_tenant_s_queue_is_predicted_as_before() -> None:
    """The tenant's own calls all go first (first come first served within a tenant), as every
    call did before the queue was predicted per tenant: the same figure, to the bit, named or
    not; another tenant's call goes after the one in progress and a quantum of each backlog."""
    named, unnamed = ReplicaStates(), ReplicaStates()
    for n, tokens in enumerate((2_000, 700, 3_100, 16, 1_234)):
        named.sent("r", tokens + 50, tokens, [], now=0.1 * n, tenant="a", fair_queue=True)
        unnamed.sent("r", tokens + 50, tokens, [], now=0.1 * n)
    every = (2_000 - 1_500) / RATE + (700 + 3_100 + 16 + 1_234) / RATE  # the head 1.5 s in
    assert named.queued_s("r", RATE, 1.5, tenant="a", prompt_tokens=900) == every
    assert unnamed.queued_s("r", RATE, 1.5) == every
    # b's 200 tokens fit its first turn's 256: after a's call in progress, before a's next
    # (700 tokens: a's third turn); b's 1,000 tokens take four turns, in which a's 700 go
    assert named.queued_s("r", RATE, 1.5, tenant="b", uncached_tokens=200) == pytest.approx(0.5)
    assert named.queued_s("r", RATE, 1.5, tenant="b", uncached_tokens=1_000) == pytest.approx(
        0.5 + 0.7
    )


def test_a_stalled_head_still_counts_for_every_tenant() -> None:
    """The call in progress is ahead of every tenant's, and a stalled one (far past its
    predicted prefill: a hung replica) counts as busy for as long again as it has overrun
    that, whoever asks."""
    states = ReplicaStates()
    states.sent(
        "r", 1_000, 1_000, [], now=0.0, tenant="a", fair_queue=True
    )  # 1 s predicted: stalled after 3 s
    states.sent("r", 5_000, 5_000, [], now=0.0, tenant="a", fair_queue=True)
    at = 10.0  # 7 s past the stall
    assert states.queued_s("r", RATE, at, tenant="b", uncached_tokens=100) == pytest.approx(7.0)
    assert states.queued_s("r", RATE, at, tenant="a", uncached_tokens=100) == pytest.approx(12.0)


def test_a_prefill_whose_caller_left_is_ahead_of_every_tenant() -> None:
    """A self-hosted engine prefills a prompt whose caller left (``abandoned``): it holds the
    engine until its predicted end whoever asks, and leaves its tenant's turns."""
    states = ReplicaStates()
    states.sent("r", 1_000, 1_000, [], now=0.0, tenant="a", fair_queue=True)
    left = states.sent("r", 3_000, 3_000, [], now=0.0, tenant="a", fair_queue=True)
    states.abandoned("r", left, RATE, now=0.0)  # predicted to end at 4 s
    states.sent("r", 2_000, 2_000, [], now=0.0, tenant="a", fair_queue=True)
    assert states.queued_s("r", RATE, 0.0, tenant="b", uncached_tokens=100) == pytest.approx(4.0)
    assert states.queued_s("r", RATE, 0.0, tenant="a", uncached_tokens=100) == pytest.approx(6.0)


def test_the_router_threads_each_request_s_tenant_to_its_replica_s_queue(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Through the router's request path: a request's tenant reaches the chooser and the
    replica's queue, so another tenant's call is predicted to overtake a's backlog there."""
    clock = Clock()
    asked: list[str] = []
    choose = ReplicaChooser.choose

    def recording(self: ReplicaChooser, request: Request, *args: Any) -> Route:
        asked.append(request.tenant)
        return choose(self, request, *args)

    monkeypatch.setattr(ReplicaChooser, "choose", recording)

    async def scenario() -> None:
        models = Models(clock, {}, slow={"small-1": 30.0})  # sim-small's one replica
        pipeline = _pipeline(models)
        calls = []
        for i in range(2):
            request = build_request(f"question {i}", model="sim-small", request_id=f"r{i}")
            run = pipeline.run("tenant-a", request, streamed=True)
            models.called.clear()
            calls.append(asyncio.create_task(_drain(run)))
            await reached(models.called, "models.called")
        assert asked == ["tenant-a", "tenant-a"] and models.calls == ["small-1", "small-1"]
        # both 2,000-token prompts wait for their first report: tenant-a's next waits for
        # both, tenant-b's only for the one in progress
        loads, now = pipeline.loads, clock()
        own = loads.queued_s("small-1", 1_000.0, now, tenant="tenant-a", uncached_tokens=100)
        other = loads.queued_s("small-1", 1_000.0, now, tenant="tenant-b", uncached_tokens=100)
        assert (own, other) == pytest.approx((4.0, 2.0))
        await asyncio.gather(*calls)
        await pipeline.drain()

    run_on_clock(clock, scenario)


async def _drain(run: AsyncIterator[object]) -> None:
    async for _ in run:
        pass


async def test_the_prediction_is_the_simulated_replica_s_first_token() -> None:
    """Replayed through the model service's own simulated replica (``SimEngine``, its fair
    prefill queue, its KV cache, on virtual time): tenant b floods it with twelve cold
    ~1,200-word prompts; tenant a's next turn, its session prefix warm there, arrives during
    b's first prefill. The router, told the same calls, predicts a's first token when the
    replica gives it; counting all of b's queue it predicted twelve prefills more."""
    tokenizer, clock, waits = load_cl100k(), VirtualTime(), Waits()
    engine = engine_fair._engine(tokenizer, clock, waits)
    spec = engine_fair._spec()
    await clock.run([asyncio.create_task(_first(engine, clock, "a", _prompt("a", 800)))])
    states = ReplicaStates()
    chooser = ReplicaChooser(ChoiceSettings(), states)
    flood = []
    for i in range(12):
        prepared = engine.prepare("b", "sim-small", _prompt(f"b{i}", 1200))
        tokens = prepared.prompt_tokens
        states.sent("replica-1", tokens, tokens, [], now=clock.now, tenant="b", fair_queue=True)
        flood.append(asyncio.create_task(_first(engine, clock, "b", _prompt(f"b{i}", 1200))))
    await clock.settle()  # b's first prompt prefilling, the rest waiting their turn
    sent_at = clock.now
    turn = engine.prepare("a", "sim-small", _prompt("a", 820))
    light = asyncio.create_task(_first(engine, clock, "a", _prompt("a", 820)))
    results = await clock.run([*flood, light])
    a_at, a_start = results[-1]
    assert a_start.kv_cached_tokens > 0.9 * a_start.prompt_tokens  # its session prefix held
    warm = a_start.kv_cached_tokens
    wanted = Request("sim-small", turn.prompt_tokens, [], spec.prefill_rate, tenant="a")
    predicted = chooser.predicted_ttft_s(wanted, "replica-1", warm, sent_at)
    assert predicted == pytest.approx(a_at - sent_at)
    # as one tenant's request, it waits for the whole backlog: b's eleven prompts waiting
    every = chooser.predicted_ttft_s(replace(wanted, tenant="b"), "replica-1", warm, sent_at)
    backlog = sum(start.prompt_tokens for _, start in results[1:-1])
    assert every == pytest.approx(predicted + backlog / spec.prefill_rate)


# -- only where the replica's queue is fair ----------------------------------------------------


def _flood_and_light(fair_queue: bool) -> tuple[Route, float]:
    """Tenant a floods r1 with eight cold 8,000-token prompts at 10,000 tokens/s; tenant b's
    prefix (9,600 of its 10,000 tokens) is warm on r1, r2 idle; b arrives 0.5 s in. Returns
    b's route and its predicted TTFT on r1."""
    chooser = ReplicaChooser(ChoiceSettings(), ReplicaStates())
    for _ in range(8):
        chooser.states.sent("r1", 8_000, 8_000, [], now=0.0, tenant="a", fair_queue=fair_queue)
    wanted = Request("m", 10_000, [], 10_000.0, tenant="b")
    route = chooser.choose(wanted, ["r1", "r2"], {"r1": 9_600}, now=0.5)
    return route, chooser.predicted_ttft_s(wanted, "r1", 9_600, 0.5)


def test_a_replica_that_serves_first_come_first_served_counts_every_tenant_s_queue() -> None:
    """A batching engine with no gate in front (vLLM or SGLang, MODEL_MAX_CONCURRENT_CALLS
    unset: models.toml's llama-3-1-8b-vllm) serves its calls in the order they came: b's call
    waits behind all eight of a's prompts, its first token 5.94 s after it arrives (r2: 1.0 s
    for its whole prefill). Predicted per tenant there, b was sent to r1 for a predicted
    0.34 s; counted whole, as the engine serves it, b goes to r2."""
    fifo_s = 8 * 8_000 / 10_000.0 - 0.5 + 400 / 10_000.0
    route, predicted = _flood_and_light(fair_queue=False)
    assert (route.order[0], route.reason) == ("r2", "replicate_prefix")
    assert predicted == pytest.approx(fifo_s) == pytest.approx(5.94)
    # the same replica behind a fair queue: b's turn comes after a's call in progress
    route, predicted = _flood_and_light(fair_queue=True)
    assert (route.order[0], route.reason) == ("r1", "ttft_warm")
    assert predicted == pytest.approx(0.34)


@pytest.mark.parametrize("expected", [True, False])
def test_the_replica_s_own_word_on_its_queue_decides_over_its_row(expected: bool) -> None:
    """The model row's guess (``sent``'s ``fair_queue``) stands until the replica's first
    report says how it serves its queue (``GenerateStart.tenant_fair_queue``): a self-hosted
    row with replica_slots whose model service has MODEL_MAX_CONCURRENT_CALLS=0, or a vLLM row
    behind a gate."""
    states = ReplicaStates()
    for _ in range(3):
        states.sent("r", 2_000, 2_000, [], now=0.0, tenant="a", fair_queue=expected)
    every, turn = (2.0 + 2.0 + 2.0), 2.0  # the one in progress, then b's 100-token turn

    def light() -> float:
        return states.queued_s("r", RATE, 0.0, tenant="b", prompt_tokens=100, uncached_tokens=100)

    assert light() == pytest.approx(turn if expected else every)
    states.queue_reported("r", tenant_fair=not expected)
    assert light() == pytest.approx(every if expected else turn)
    states.sent("r", 2_000, 2_000, [], now=0.0, tenant="a", fair_queue=expected)  # the row again
    assert light() == pytest.approx(every + 2.0 if expected else turn)


def test_a_row_is_expected_fair_where_its_replica_has_a_fair_queue_by_default() -> None:
    """The simulator's prefill queue is tenant-fair; a self-hosted row with replica_slots has
    a model service gate of as many calls by default (``max_concurrent_calls``); a batching
    engine's row and a hosted provider's have no gate unless it is set."""
    models = load_model_table().models
    expected = {name: expects_fair_queue(models[name]) for name in _ROWS}
    assert expected == _ROWS


_ROWS = {
    "sim-small": True,
    "local-small": True,  # replica_slots = 1 (llama-server --parallel 1)
    "llama-3-1-8b-vllm": False,
    "claude-haiku-4-5": False,
    "gpt-4o-mini": False,
}


def test_the_router_takes_the_replica_s_word_on_its_queue() -> None:
    """Through the router's request path: sim-small's replica says in its first report that
    it serves first come first served, so another tenant's call no longer overtakes a's
    backlog in the prediction (as it does when the replica says nothing: ``test_the_router_
    threads_each_request_s_tenant_to_its_replica_s_queue``)."""
    clock = Clock()

    async def scenario() -> None:
        models = Models(clock, {}, fair_queue={"small-1": False})
        pipeline = _pipeline(models)
        first = build_request("question", model="sim-small", request_id="r0")
        await _drain(pipeline.run("tenant-a", first, streamed=True))
        models.slow["small-1"] = 30.0
        calls = []
        for i in range(1, 3):
            request = build_request(f"question {i}", model="sim-small", request_id=f"r{i}")
            models.called.clear()
            calls.append(
                asyncio.create_task(_drain(pipeline.run("tenant-a", request, streamed=True)))
            )
            await reached(models.called, "models.called")
        loads, now = pipeline.loads, clock()
        other = loads.queued_s("small-1", 1_000.0, now, tenant="tenant-b", uncached_tokens=100)
        assert other == pytest.approx(4.0)  # both 2,000-token prompts, not the first alone
        await asyncio.gather(*calls)
        await pipeline.drain()

    run_on_clock(clock, scenario)


async def test_with_history_the_prediction_is_no_worse_than_counting_every_tenant() -> None:
    """The replica's fair queue with a history (calls arriving while others are served, so
    tenants carry deficits the router does not know) and then one more call of any tenant:
    predicted per tenant, the prefill ahead of it is no further from what the real queue
    serves first, on average, than counting every tenant's, and exact as often at least
    (measured over these 200 mixes: mean absolute error 587 against 3,843 tokens, the largest
    6,716 against 20,116; exact in 140 against 78). Not exact: the deficits tenants carry
    are not known to the router (taken as none)."""
    rng = random.Random(11)
    new_errors, old_errors = [], []
    for _ in range(200):
        new, old, actual = await _with_history(rng)
        new_errors.append(abs(new - actual))
        old_errors.append(abs(old - actual))
    mean_new, mean_old = sum(new_errors) / 200, sum(old_errors) / 200
    exact_new = sum(e < 1e-6 for e in new_errors)
    exact_old = sum(e < 1e-6 for e in old_errors)
    assert mean_new <= mean_old and exact_new >= exact_old, (mean_new, mean_old)


async def _with_history(rng: random.Random) -> tuple[float, float, float]:
    """One mix: arrivals (tenant a the heaviest) interleaved with the call in progress
    ending, on the real FairQueue (one call at the engine) and on the router's record of the
    same calls; then a probe call. Returns the prefill ahead of the probe predicted per tenant,
    predicted counting every tenant's, and served first by the queue (the call in progress
    included), in tokens."""
    queue = FairQueue(1, lambda: 0.0)
    states = ReplicaStates()
    admitted: list[int] = []  # the calls in the order the queue let them through
    calls: dict[int, tuple[int, int | None]] = {}  # each call's tokens and its ticket
    tasks: list[asyncio.Future[None]] = []

    async def call(n: int, tenant: str, tokens: int) -> None:
        await queue.acquire(tenant, tokens)
        admitted.append(n)

    def arrive(tenant: str, tokens: int) -> int:
        n = len(calls)
        calls[n] = (tokens, states.sent("r", tokens, tokens, [], 0.0, tenant=tenant))
        tasks.append(asyncio.ensure_future(call(n, tenant, tokens)))
        return n

    sizes = (16, 100, 300, 1_000, 2_500)
    for _ in range(rng.randint(5, 60)):
        if rng.random() < 0.6 or queue.running == 0:
            arrive(rng.choice("aaabc"), rng.choice(sizes))
        else:  # the call in progress reports its first token and leaves the engine
            tokens, ticket = calls[admitted[-1]]
            assert ticket is not None
            states.started("r", ticket, tokens, 0, now=0.0)
            calls[admitted[-1]] = (tokens, None)
            queue.release()
        await _settle()
    tenant, tokens = rng.choice("abcd"), rng.choice(sizes)
    old = states.queued_s(
        "r", 1.0, 0.0, tenant=tenant, prompt_tokens=tokens, uncached_tokens=tokens
    )
    states.queue_reported("r", tenant_fair=True)
    new = states.queued_s(
        "r", 1.0, 0.0, tenant=tenant, prompt_tokens=tokens, uncached_tokens=tokens
    )
    ahead = calls[admitted[-1]][0] if queue.running else 0
    probe_n = arrive(tenant, tokens)
    await _settle()
    while admitted[-1] != probe_n:
        queue.release()
        await _settle()
        if admitted[-1] != probe_n:
            ahead += calls[admitted[-1]][0]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return new, old, float(ahead)
