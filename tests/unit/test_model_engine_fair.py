"""The simulated replica's prefill queue is tenant-fair (``fair_queue``): one tenant's flood of
long prompts does not hold another tenant's prompt behind it. On virtual time (no waiting):
the engine's sleeps and its queue's clock are the same virtual clock."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from cachemesh.v1 import gateway_pb2 as pb
from services.common.models import ModelSpec, load_model_table
from services.common.tokens import Tokenizer, load_cl100k
from services.model.engine import SimEngine, Started
from services.model.kv_cache import KvBlockCache
from tests.unit.model_support import VirtualTime

FLOOD = 12


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_cl100k()


def _spec() -> ModelSpec:
    return load_model_table().models["sim-small"]


class Waits:
    def __init__(self) -> None:
        self.waited: list[tuple[str, float]] = []
        self.levels: Counter[str] = Counter()

    def __call__(self, model: str, seconds: float) -> None:
        self.waited.append((model, seconds))

    def waiting(self, tenant: str, change: int) -> None:
        self.levels[tenant] += change


def _engine(tokenizer: Tokenizer, clock: VirtualTime, waits: Waits) -> SimEngine:
    return SimEngine(
        models={"sim-small": _spec()},
        replica_id="replica-1",
        tokenizer=tokenizer,
        kv_cache=KvBlockCache(100_000),
        time_scale=1.0,
        sleep=clock,
        clock=lambda: clock.now,
        watcher=waits,
        waits=waits,
    )


def _prompt(tag: str, words: int) -> pb.CompleteRequest:
    text = f"{tag}: " + " ".join(f"w{tag}{j}" for j in range(words))
    return pb.CompleteRequest(
        model="sim-small",
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=text)])],
        max_tokens=8,
    )


async def _first(
    engine: SimEngine, clock: VirtualTime, tenant: str, request: pb.CompleteRequest
) -> tuple[float, Started]:
    prepared = engine.prepare(tenant, "sim-small", request)
    first: tuple[float, Started] | None = None
    async for event in engine.run(prepared):
        if isinstance(event, Started):
            first = (clock.now, event)
    assert first is not None
    return first


async def test_a_light_tenant_waits_one_prefill_of_a_flood_not_the_flood(
    tokenizer: Tokenizer,
) -> None:
    clock, waits = VirtualTime(), Waits()
    engine = _engine(tokenizer, clock, waits)
    flood = [
        asyncio.create_task(_first(engine, clock, "b", _prompt(f"b{i}", 1200)))
        for i in range(FLOOD)
    ]
    await clock.settle()  # b's prompts are queued, the first one prefilling
    assert waits.levels == {"b": FLOOD - 1}
    light = asyncio.create_task(_first(engine, clock, "a", _prompt("a", 20)))
    await clock.settle()
    results = await clock.run([*flood, light])
    (b_firsts, (a_at, a_start)) = results[:-1], results[-1]
    one_b = b_firsts[0][1].prompt_tokens / _spec().prefill_rate
    own = a_start.prompt_tokens / _spec().prefill_rate
    # a's prompt waited for the prefill under way, none of b's backlog
    assert a_at == pytest.approx(one_b + own)
    assert a_start.queue_wait_s == pytest.approx(one_b)
    assert sum(at < a_at for at, _ in b_firsts) == 1
    # b's own prompts in their order, each after the one before
    b_times = [at for at, _ in b_firsts]
    assert b_times == sorted(b_times)
    assert waits.levels == {"a": 0, "b": 0}
    assert len(waits.waited) == FLOOD + 1 and {m for m, _ in waits.waited} == {"sim-small"}


async def test_before_the_fair_queue_the_same_flood_held_the_light_tenant_behind_it(
    tokenizer: Tokenizer,
) -> None:
    """The same load on one tenant's queue (what first come first served did to everyone):
    the light prompt's first token comes after the whole backlog."""
    clock, waits = VirtualTime(), Waits()
    engine = _engine(tokenizer, clock, waits)
    flood = [
        asyncio.create_task(_first(engine, clock, "b", _prompt(f"b{i}", 1200)))
        for i in range(FLOOD)
    ]
    await clock.settle()
    light = asyncio.create_task(_first(engine, clock, "b", _prompt("a", 20)))
    results = await clock.run([*flood, light])
    a_at = results[-1][0]
    assert sum(at < a_at for at, _ in results[:-1]) == FLOOD
