"""SimEngine: validation codes, latency through the sleep seam, KV reuse, the stream's shape,
the replica's prefill queue."""

from __future__ import annotations

import asyncio

import pytest

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import prefix_cache_pb2 as pc
from cachemesh.v1.prompt_pb2 import PromptFacts
from services.common.clock import ManualClock
from services.common.errors import Code, RequestError
from services.common.models import ModelSpec, load_model_table
from services.common.prompt import canonical_blocks, prompt_token_ids
from services.common.tokens import Tokenizer, load_cl100k
from services.model.api import _chunk
from services.model.engine import (
    Delta,
    Event,
    Finished,
    SimEngine,
    Started,
    decode_seconds,
    prefill_seconds,
)
from services.model.kv_cache import BLOCK_SIZE, KvBlockCache
from services.prefix_cache.api import PrefixCacheApi
from services.prefix_cache.commit_records import CommitRecords
from services.prefix_cache.core import PrefixCacheCore, TokenizerSlot
from services.prefix_cache.ledger import InMemoryLedger
from services.prefix_cache.replica_view import ReplicaViews
from services.prefix_cache.totals import TotalsLedger
from services.prefix_cache.warm import InMemoryWarmStore
from tests.unit.model_support import RecordingSleep, VirtualTime

LONG_SYSTEM = "You are a support agent for a cache company. " * 60


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_cl100k()


@pytest.fixture
def sleep() -> RecordingSleep:
    return RecordingSleep()


def _models() -> dict[str, ModelSpec]:
    table = load_model_table()
    return {"sim-small": table.models["sim-small"], "sim-large": table.models["sim-large"]}


def _engine(
    tokenizer: Tokenizer, sleep: RecordingSleep, *, scale: float = 1.0, capacity: int = 1000
) -> SimEngine:
    return SimEngine(
        models=_models(),
        replica_id="replica-1",
        tokenizer=tokenizer,
        kv_cache=KvBlockCache(capacity),
        time_scale=scale,
        sleep=sleep,
    )


def _request(question: str, max_tokens: int = 1000) -> pb.CompleteRequest:
    return pb.CompleteRequest(
        model="sim-large",
        system=[pb.ContentBlock(text=LONG_SYSTEM)],
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=question)])],
        max_tokens=max_tokens,
    )


async def _run(engine: SimEngine, request: pb.CompleteRequest, tenant: str = "t") -> list[Event]:
    prepared = engine.prepare(tenant, "sim-large", request)
    return [event async for event in engine.run(prepared)]


async def test_stream_is_start_deltas_end_and_deltas_make_the_answer(
    tokenizer: Tokenizer, sleep: RecordingSleep
) -> None:
    engine = _engine(tokenizer, sleep)
    events = await _run(engine, _request("How do I clear the cache?"))
    start, *deltas, end = events
    assert isinstance(start, Started) and isinstance(end, Finished)
    assert start.replica == "replica-1"
    assert all(isinstance(delta, Delta) for delta in deltas)
    text = "".join(delta.text for delta in deltas if isinstance(delta, Delta))
    assert text.startswith("[simulated sim-large answer]")
    assert end.output_tokens == tokenizer.count(text)
    assert end.stop_reason == "end_turn"
    assert all(1 <= tokenizer.count(d.text) <= 4 for d in deltas if isinstance(d, Delta))
    assert len(deltas) == -(-end.output_tokens // 4)


async def test_at_zero_time_the_answer_is_one_delta_and_the_same_text(
    tokenizer: Tokenizer, sleep: RecordingSleep
) -> None:
    question = _request("How do I clear the cache?")
    paced = await _run(_engine(tokenizer, sleep), question)
    instant = await _run(_engine(tokenizer, sleep, scale=0.0), question)
    start, delta, end = instant
    assert isinstance(start, Started) and isinstance(delta, Delta) and isinstance(end, Finished)
    assert delta.text == "".join(e.text for e in paced if isinstance(e, Delta))
    assert end == paced[-1]


async def test_latency_follows_uncached_prefill_and_decode(
    tokenizer: Tokenizer, sleep: RecordingSleep
) -> None:
    spec = _models()["sim-large"]
    engine = _engine(tokenizer, sleep)
    first = await _run(engine, _request("How do I clear the cache?"))
    start, end = first[0], first[-1]
    assert isinstance(start, Started) and isinstance(end, Finished)
    assert start.kv_cached_tokens == 0
    assert sleep.calls[0] == pytest.approx(start.prompt_tokens / spec.prefill_rate)
    assert sum(sleep.calls[1:]) == pytest.approx(end.output_tokens / spec.decode_rate)
    first_prefill = sleep.calls[0]

    sleep.calls.clear()
    second = await _run(engine, _request("How do I clear the cache?"))
    again = second[0]
    assert isinstance(again, Started)
    assert again.kv_cached_tokens == (start.prompt_tokens - 1) // BLOCK_SIZE * BLOCK_SIZE
    uncached = start.prompt_tokens - again.kv_cached_tokens
    assert 1 <= uncached <= BLOCK_SIZE
    assert sleep.calls[0] == pytest.approx(uncached / spec.prefill_rate)
    assert sleep.calls[0] < first_prefill / 50
    assert second[1:] == first[1:]  # same prompt, same answer


async def test_shared_prefix_is_reused_only_by_the_same_tenant(
    tokenizer: Tokenizer, sleep: RecordingSleep
) -> None:
    engine = _engine(tokenizer, sleep)
    await _run(engine, _request("First question?"), tenant="a")
    other_question = await _run(engine, _request("A different question?"), tenant="a")
    other_tenant = await _run(engine, _request("First question?"), tenant="b")
    shared, isolated = other_question[0], other_tenant[0]
    assert isinstance(shared, Started) and isinstance(isolated, Started)
    first_ids = prompt_token_ids(canonical_blocks(_request("First question?"), tokenizer))
    other_ids = prompt_token_ids(canonical_blocks(_request("A different question?"), tokenizer))
    common = next(i for i, (x, y) in enumerate(zip(first_ids, other_ids, strict=False)) if x != y)
    assert common > 500  # the long system prompt
    assert shared.kv_cached_tokens == common // BLOCK_SIZE * BLOCK_SIZE
    assert isolated.kv_cached_tokens == 0


def test_latency_arithmetic_scales() -> None:
    spec = _models()["sim-small"]
    assert prefill_seconds(spec, 12000, 1.0) == pytest.approx(1.0)
    assert prefill_seconds(spec, 12000, 0.5) == pytest.approx(0.5)
    assert decode_seconds(spec, 180, 2.0) == pytest.approx(2.0)
    assert decode_seconds(spec, 180, 0.0) == 0.0


async def test_time_scale_zero_asks_for_no_waiting(
    tokenizer: Tokenizer, sleep: RecordingSleep
) -> None:
    await _run(_engine(tokenizer, sleep, scale=0.0), _request("Anything?"))
    assert sleep.calls and all(seconds == 0.0 for seconds in sleep.calls)


async def test_max_tokens_cut(tokenizer: Tokenizer, sleep: RecordingSleep) -> None:
    events = await _run(_engine(tokenizer, sleep), _request("How do I clear the cache?", 7))
    end = events[-1]
    text = "".join(e.text for e in events if isinstance(e, Delta))
    assert isinstance(end, Finished)
    assert (end.output_tokens, end.stop_reason) == (7, "max_tokens")
    assert tokenizer.count(text) == 7


@pytest.mark.parametrize(
    ("tenant", "model", "max_tokens", "code", "names"),
    [
        ("", "sim-large", 100, Code.INVALID_ARGUMENT, "tenant"),
        ("t", "gpt-9", 100, Code.INVALID_ARGUMENT, "sim-small, sim-large"),
        ("t", "sim-large", 0, Code.INVALID_ARGUMENT, "max_tokens"),
        ("t", "sim-large", -5, Code.INVALID_ARGUMENT, "max_tokens"),
        ("t", "sim-large", 64001, Code.INVALID_ARGUMENT, "max_tokens"),
    ],
)
def test_bad_input_is_refused(
    tokenizer: Tokenizer,
    sleep: RecordingSleep,
    tenant: str,
    model: str,
    max_tokens: int,
    code: Code,
    names: str,
) -> None:
    with pytest.raises(RequestError) as caught:
        _engine(tokenizer, sleep).prepare(tenant, model, _request("Hi?", max_tokens))
    assert caught.value.code == code
    assert names in caught.value.message
    if model == "gpt-9":
        assert "model 'gpt-9'" in caught.value.message


def test_prompt_over_the_context_window_is_resource_exhausted(
    tokenizer: Tokenizer, sleep: RecordingSleep
) -> None:
    small_window = _models()["sim-large"].model_copy(update={"context_window_tokens": 100})
    engine = SimEngine(
        models={"sim-large": small_window},
        replica_id="r",
        tokenizer=tokenizer,
        kv_cache=KvBlockCache(10),
        time_scale=1.0,
        sleep=sleep,
    )
    with pytest.raises(RequestError) as caught:
        engine.prepare("t", "sim-large", _request("Hi?"))
    assert caught.value.code == Code.RESOURCE_EXHAUSTED
    assert "context window of 100" in caught.value.message


def test_empty_prompt_is_invalid(tokenizer: Tokenizer, sleep: RecordingSleep) -> None:
    with pytest.raises(RequestError, match="messages"):
        _engine(tokenizer, sleep).prepare("t", "sim-large", pb.CompleteRequest(max_tokens=10))


async def test_a_stopped_stream_does_not_sleep_on(
    tokenizer: Tokenizer, sleep: RecordingSleep
) -> None:
    engine = _engine(tokenizer, sleep)
    stream = engine.run(engine.prepare("t", "sim-large", _request("Long answer please?")))
    assert isinstance(await anext(stream), Started)
    assert isinstance(await anext(stream), Delta)
    await stream.aclose()  # what a cancelled caller does to the generator
    assert len(sleep.calls) == 2  # prefill and one delta, nothing after


async def test_plans_prompt_facts_prepare_what_the_engine_would_compute(
    tokenizer: Tokenizer, sleep: RecordingSleep
) -> None:
    """The facts prefix-cache's Plan returns (one tokenization per request) are exactly what
    the engine derives itself: same token count, KV blocks and answer."""
    table = load_model_table()
    core = PrefixCacheCore(
        table=table,
        tokenizer=TokenizerSlot(tokenizer),
        cache=InMemoryWarmStore(100),
        views=ReplicaViews(1000),
        ledger=InMemoryLedger(CommitRecords(3_600_000, 100), TotalsLedger()),
        clock=ManualClock(),
        lookback=20,
    )
    request = _request("How do I clear the cache?")
    plan = await PrefixCacheApi(core).plan(
        pc.PlanRequest(tenant="t", model="sim-large", request=request, replicas=["r"])
    )
    engine = _engine(tokenizer, sleep)
    own = engine.prepare("t", "sim-large", request)
    given = engine.prepare("t", "sim-large", request, plan.prompt)
    assert given == own
    assert plan.prompt.prompt_tokens == own.prompt_tokens > BLOCK_SIZE


def test_inconsistent_prompt_facts_are_refused(tokenizer: Tokenizer, sleep: RecordingSleep) -> None:
    facts = PromptFacts(prompt_tokens=40, kv_block_hashes=b"\x00" * 32, digest="ab")
    with pytest.raises(RequestError, match="2 block hashes") as caught:
        _engine(tokenizer, sleep).prepare("t", "sim-large", _request("Hi?"), facts)
    assert caught.value.code == Code.INVALID_ARGUMENT


def _queued_engine(tokenizer: Tokenizer, clock: VirtualTime) -> SimEngine:
    return SimEngine(
        models=_models(),
        replica_id="replica-1",
        tokenizer=tokenizer,
        kv_cache=KvBlockCache(10_000),
        time_scale=1.0,
        sleep=clock,
    )


async def _first_token(
    engine: SimEngine, clock: VirtualTime, request: pb.CompleteRequest
) -> tuple[float, Started]:
    """When the request's first token came (virtual seconds) and its report; decodes to the end."""
    prepared = engine.prepare("t", "sim-large", request)
    first: tuple[float, Started] | None = None
    async for event in engine.run(prepared):
        if isinstance(event, Started):
            first = (clock.now, event)
    assert first is not None
    return first


def _own_prompt(i: int, max_tokens: int = 40) -> pb.CompleteRequest:
    text = f"Prompt {i}. " + " ".join(f"fact {i}-{j} holds." for j in range(300))
    return pb.CompleteRequest(
        model="sim-large",
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=text)])],
        max_tokens=max_tokens,
    )


async def test_a_replica_prefills_one_request_at_a_time_first_come_first_served(
    tokenizer: Tokenizer,
) -> None:
    """Concurrent prompts queue for the replica's prefill, as the router's replica model and
    bench-prefix's replay assume: the k-th first token comes after the k prefills before it
    (it was: every prompt prefilled in parallel, each at the full rate)."""
    spec, clock = _models()["sim-large"], VirtualTime()
    engine = _queued_engine(tokenizer, clock)
    tasks = [asyncio.create_task(_first_token(engine, clock, _own_prompt(i))) for i in range(4)]
    firsts = await clock.run(tasks)
    done = 0.0
    for at, started in firsts:  # in arrival order
        assert started.kv_cached_tokens == 0
        done += started.prompt_tokens / spec.prefill_rate
        assert at == pytest.approx(done)


async def test_a_prompt_queued_behind_its_prefix_reuses_it(tokenizer: Tokenizer) -> None:
    """The KV cache is read when the prefill begins: a request that waited behind one with the
    same prefix finds its blocks there."""
    spec, clock = _models()["sim-large"], VirtualTime()
    engine = _queued_engine(tokenizer, clock)
    questions = ("How do I clear the cache?", "How do I size the cache?")
    tasks = [asyncio.create_task(_first_token(engine, clock, _request(q))) for q in questions]
    (_, one), (at, two) = await clock.run(tasks)
    assert two.kv_cached_tokens > 0.9 * one.prompt_tokens
    uncached = one.prompt_tokens + two.prompt_tokens - two.kv_cached_tokens
    assert at == pytest.approx(uncached / spec.prefill_rate)


async def test_a_request_cancelled_in_the_queue_leaves_it(tokenizer: Tokenizer) -> None:
    spec, clock = _models()["sim-large"], VirtualTime()
    engine = _queued_engine(tokenizer, clock)
    tasks = [asyncio.create_task(_first_token(engine, clock, _own_prompt(i))) for i in range(3)]
    await clock.settle()
    tasks[1].cancel()  # still waiting behind the first prefill
    first, third = await clock.run(tasks)
    prefilled = first[1].prompt_tokens + third[1].prompt_tokens
    assert third[0] == pytest.approx(prefilled / spec.prefill_rate)


async def test_each_start_names_the_engine_run_it_was_built_with(
    tokenizer: Tokenizer, sleep: RecordingSleep
) -> None:
    """The simulator's run (``instance``, drawn at its process's start: its KV cache dies with
    the process) on every start and on the replica's ``GenerateStart`` (prefix-cache forgets
    the replica's view when it changes); none told: empty, as before."""
    run = SimEngine(
        models=_models(),
        replica_id="replica-1",
        tokenizer=tokenizer,
        kv_cache=KvBlockCache(1000),
        time_scale=0.0,
        sleep=sleep,
        instance="run-1",
    )
    for _ in range(2):
        start = (await _run(run, _request("How do I clear the cache?")))[0]
        assert isinstance(start, Started) and start.engine_instance == "run-1"
        assert _chunk(start).start.engine_instance == "run-1"
    plain = (await _run(_engine(tokenizer, sleep, scale=0.0), _request("Hours?")))[0]
    assert isinstance(plain, Started) and _chunk(plain).start.engine_instance == ""
