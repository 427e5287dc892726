"""``Idempotency-Key`` through the HTTP front: a caller's retry that reaches another router (a
second front replica behind the load balancer, or the router restarted) is answered from the
routers' shared answer ledger, not run and billed again. Two real Gateway servicers share a
real Redis ledger (tests/redis_server.py), each behind its own front; the pipeline is a fake."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from cachemesh.v1 import gateway_pb2 as pb
from services.router import servicer as servicer_module
from services.router.answer_ledger import RedisAnswerLedger
from services.router.servicer import GatewayServicer
from tests.redis_server import client_of, redis_server
from tests.unit.gateway_support import gateway_servicer
from tests.unit.test_http_front_app import KEY, serving
from tests.unit.test_router_answer_ledger import FakePipeline

ASK: list[Any] = [{"role": "user", "content": "What is a KV cache?"}]


@pytest.fixture
def ledger_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    # a loaded machine may take longer than the router's 0.5 s to answer the ledger: these
    # tests check what the ledger does, not how fast
    monkeypatch.setattr(servicer_module, "LEDGER_TIMEOUT_S", 10.0)
    with redis_server(tmp_path) as url:
        yield url


def _router(
    url: str, pipeline: FakePipeline | None = None
) -> tuple[GatewayServicer, FakePipeline, RedisAnswerLedger]:
    """A router that knows the front's key, its answer ledger in the Redis at ``url``."""
    if pipeline is None:
        pipeline = FakePipeline()
    ledger = RedisAnswerLedger(client_of(url), ttl_s=60)
    return gateway_servicer(pipeline, {KEY: "tenant-a"}, ledger=ledger), pipeline, ledger


async def test_a_retry_through_another_front_and_router_is_answered_once(
    tmp_path: Path, ledger_url: str
) -> None:
    first, first_pipe, first_ledger = _router(ledger_url)
    second, second_pipe, second_ledger = _router(ledger_url)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with (
        serving(tmp_path / "a", first) as one,
        serving(tmp_path / "b", second) as two,
    ):
        clients = [
            anthropic.AsyncAnthropic(base_url=served.base, api_key=KEY, max_retries=0)
            for served in (one, two)
        ]
        answers = [
            await client.messages.create(
                model="sim-small",
                max_tokens=50,
                messages=ASK,
                extra_headers={"Idempotency-Key": "order-42"},
            )
            for client in clients
        ]
        for client in clients:
            await client.close()
    await first_ledger.close()
    await second_ledger.close()
    assert (first_pipe.runs, second_pipe.runs) == (1, 0)  # one model call, one bill
    assert [a.content[0].type == "text" and a.content[0].text for a in answers] == [
        "answer 1",
        "answer 1",
    ]


async def test_a_replayed_answer_is_marked_so_its_cost_is_not_added_twice(
    tmp_path: Path, ledger_url: str
) -> None:
    """The retry of an answered Idempotency-Key got the first call's headers unchanged
    (``x-cachemesh-cost-nanos`` again, no mark): an app summing the header counted the one
    bill twice. A replay now says ``x-cachemesh-replayed: true``, and a stream's last event
    ``"replayed": true``; the first call's answer carries neither mark. (A stream whose start
    takes longer than ``HTTP_FRONT_PING_S`` has its head sent before it, without the mark:
    the next test. Here the pings are put off, lest a loaded machine's replay take longer
    than the fixture's 50 ms: 2 runs of 6 under a busy CPU did, the stream's header
    unmarked.)"""
    router, pipeline, ledger = _router(ledger_url)
    async with serving(tmp_path, router, HTTP_FRONT_PING_S="60") as served:
        client = anthropic.AsyncAnthropic(base_url=served.base, api_key=KEY, max_retries=0)
        gpt = openai.AsyncOpenAI(base_url=f"{served.base}/v1", api_key=KEY, max_retries=0)
        heads = []
        for _ in range(2):
            raw = await client.messages.with_raw_response.create(
                model="sim-small",
                max_tokens=50,
                messages=ASK,
                extra_headers={"Idempotency-Key": "order-43"},
            )
            heads.append(raw.headers)
        facts = []
        for _ in range(2):
            stream = await gpt.chat.completions.with_raw_response.create(
                model="sim-small",
                max_tokens=50,
                messages=ASK,
                stream=True,
                extra_headers={"Idempotency-Key": "order-44"},
            )
            heads.append(stream.headers)
            chunks = [c async for c in stream.parse()]
            facts.append(next(c for c in chunks if c.choices and c.choices[0].finish_reason))
        await client.close()
        await gpt.close()
    await ledger.close()
    assert pipeline.runs == 2  # one model call per key
    assert [h.get("x-cachemesh-replayed") for h in heads] == [None, "true", None, "true"]
    assert heads[0]["x-cachemesh-cost-nanos"] == heads[1]["x-cachemesh-cost-nanos"]
    assert [(f.model_extra or {})["cachemesh"]["replayed"] for f in facts] == [False, True]


class HeldPipeline(FakePipeline):
    """Its calls answer once ``go`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.go = asyncio.Event()

    async def run(self, *args: Any, **kwargs: Any) -> AsyncIterator[pb.CompleteChunk]:
        await asyncio.wait_for(self.go.wait(), 60)
        async for chunk in super().run(*args, **kwargs):
            yield chunk


async def test_a_streamed_retry_that_waited_past_the_ping_is_marked_in_its_last_event(
    tmp_path: Path, ledger_url: str
) -> None:
    """A stream's retry that waits on its first call (same ``Idempotency-Key``, still
    answering) longer than ``HTTP_FRONT_PING_S`` has its head sent before the router knows it
    is a replay (the README's slow start): its headers cannot say ``x-cachemesh-replayed``,
    nor the layer. Its last event, the one with the cost, says ``"replayed": true``: an app
    that sums a stream's cost does not add the first call's twice."""
    pipeline = HeldPipeline()
    router, _, ledger = _router(ledger_url, pipeline)
    async with serving(
        tmp_path, router, HTTP_FRONT_MAX_IN_FLIGHT_PER_KEY="2", HTTP_FRONT_PING_S="0.05"
    ) as served:
        gpt = openai.AsyncOpenAI(base_url=f"{served.base}/v1", api_key=KEY, max_retries=0)
        streams = []
        for _ in range(2):  # each returns with its head, sent after HTTP_FRONT_PING_S
            streams.append(
                await gpt.chat.completions.with_raw_response.create(
                    model="sim-small",
                    max_tokens=50,
                    messages=ASK,
                    stream=True,
                    extra_headers={"Idempotency-Key": "order-45"},
                )
            )
        pipeline.go.set()  # the first call answers; its retry waited on it
        facts = []
        for stream in streams:
            chunks = [c async for c in stream.parse()]
            facts.append(next(c for c in chunks if c.choices and c.choices[0].finish_reason))
        await gpt.close()
    await ledger.close()
    assert pipeline.runs == 1
    heads = [
        (s.headers.get("x-cachemesh-served-by"), s.headers.get("x-cachemesh-replayed"))
        for s in streams
    ]
    assert heads == [(None, None), (None, None)]  # both heads went before their start
    assert [(f.model_extra or {})["cachemesh"]["replayed"] for f in facts] == [False, True]
