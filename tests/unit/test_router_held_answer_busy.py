"""A one-slot engine (llama-server --parallel 1, local-small's ``replica_slots``) decoding an
answer whose caller reads slowly or not at all: the router reads that answer's chunks only as
its caller takes them (the caller's flow control holds the router's write), so the replica
gives the router no sign of life, yet it is busy, not failing: a call sent there meanwhile
waits for the slot, and its deadline spent so counts nothing against the replica (three such
ejected it, "ejected for 5.0 s after 3 failures in a row"). The clock is injected, and is the
event loop's (``run_on_clock``): the long answer's tokens and the waiting calls' deadlines come
on it, not on real time beside it."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from cachemesh import build_request
from services.common.errors import RequestError
from services.router.pipeline import Pipeline
from tests.unit.test_router_replica_ejection import Clock, Models, Slot, _ask, _pipeline
from tests.unit.virtual_loop import run_on_clock

ONE_REPLICA: dict[str, tuple[str, ...]] = {"local-small": ("local-1",)}


def test_a_deadline_spent_behind_an_answer_its_caller_holds_is_not_the_replicas_fault() -> None:
    clock = Clock()

    async def scenario() -> None:
        models = Models(clock, {}, behind_s=0.01)
        pipeline: Pipeline = _pipeline(models, ONE_REPLICA)
        slot = models.one_slot["local-1"] = Slot()
        request = build_request("a long answer", model="local-small", request_id="held")
        async with contextlib.aclosing(pipeline.run("tenant-a", request)) as held:
            async for chunk in held:
                if chunk.WhichOneof("part") == "delta":
                    break  # its caller reads no further: the router holds its write
            for i in range(1, 4):  # three in a row would eject a failing replica
                with pytest.raises(RequestError, match="DEADLINE_EXCEEDED"):
                    await _ask(pipeline, i, remaining_s=30.0, model="local-small")
            assert not pipeline._dispatch.health("local-small").ejected("local-1", clock())
            slot.done.set()
        await asyncio.sleep(0)
        await pipeline.drain()

    run_on_clock(clock, scenario)
