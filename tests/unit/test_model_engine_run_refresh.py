"""A self-hosted engine's run (``GenerateStart.engine_instance``) is learned off the call path
(``services.model.providers.engine_run``): a call never waits for the engine's /props, a
/props that fails in any way leaves calls answered (run not told), an engine without /props is
not asked with each call, and each change of state is logged once. Through the real OpenAI
adapter and replica against a loopback engine whose /props misbehaves."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from services.common.clock import ManualClock
from services.model.providers.api import ProviderApi
from services.model.providers.engine_run import EngineRun, NoProps
from services.model.providers.openai_wire import engine_run
from tests.providers.replica import provider_replica, provider_settings

MODEL = "local-small"  # a self_hosted row
MARKER = "<__media_x__>"


@dataclass
class Engine:
    """A loopback OpenAI-compatible engine; its /props by ``props``."""

    props: Callable[[web.Request], Awaitable[web.StreamResponse]]
    props_asked: int = 0
    base_url: str = ""
    chats: list[str] = field(default_factory=list)


async def _chat(request: web.Request) -> web.StreamResponse:
    await request.json()
    resp = web.StreamResponse(status=200, headers={"content-type": "text/event-stream"})
    await resp.prepare(request)
    base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    delta = {"role": "assistant", "content": "hi"}
    for event in (
        {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]},
        {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {**base, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 1}},
    ):
        await resp.write(f"data: {json.dumps(event)}\n\n".encode())
    await resp.write(b"data: [DONE]\n\n")
    return resp


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Engine], Awaitable[Engine]]]:
    runners: list[web.AppRunner] = []

    async def start(engine: Engine) -> Engine:
        async def props(request: web.Request) -> web.StreamResponse:
            engine.props_asked += 1
            return await engine.props(request)

        app = web.Application()
        app.router.add_get("/props", props)
        app.router.add_post("/v1/chat/completions", _chat)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        engine.base_url = f"http://127.0.0.1:{port}/v1"
        return engine

    yield start
    for runner in runners:
        await runner.cleanup()


def _replica(engine: Engine) -> tuple[ProviderApi, model_pb2.GenerateRequest]:
    """A replica in front of ``engine``, and a call of it."""
    settings = provider_settings("openai", engine.base_url, upstream_ids={MODEL: "m"})
    message = pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="Say hi.")])
    request = pb.CompleteRequest(model=MODEL, max_tokens=4, messages=[message])
    call = model_pb2.GenerateRequest(tenant="t", model=MODEL, request=request)
    return provider_replica(settings, [MODEL]), call


async def _starts(engine: Engine, calls: int) -> list[str]:
    """``calls`` calls one after the other through one replica: each start's run."""
    api, call = _replica(engine)
    runs = []
    try:
        for _ in range(calls):
            chunks = [c async for c in api.generate(call, 60.0)]
            starts = [c.start for c in chunks if c.HasField("start")]
            assert len(starts) == 1 and chunks[-1].HasField("end"), chunks
            runs.append(starts[0].engine_instance)
    finally:
        await api.close()
    return runs


async def test_a_call_never_waits_for_a_props_that_has_not_answered(
    serve: Callable[[Engine], Awaitable[Engine]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """/props answers only once the first call is whole: the call is answered meanwhile
    (before, its start waited for /props, 2.03 s when it hung; here, with the per-read
    timeout raised as a trickling /props made it, for ever), without the run; a later call
    carries it."""
    monkeypatch.setattr("services.model.providers.openai_wire.PROPS_TIMEOUT_S", 3600.0)
    gate = asyncio.Event()

    async def props(_: web.Request) -> web.StreamResponse:
        await gate.wait()
        return web.json_response({"media_marker": MARKER})

    engine = await serve(Engine(props))
    api, call = _replica(engine)
    try:
        # a hang guard only (old code: never answered): nothing is timed
        first = await asyncio.wait_for(_collect(api.generate(call, 60.0)), 60.0)
        assert engine.props_asked <= 1 and not gate.is_set()  # asked, maybe not yet there
        assert [c.start.engine_instance for c in first if c.HasField("start")] == [""]
        gate.set()
        runs: list[str] = []
        for _ in range(200):  # the refresh lands in the background
            chunks = await _collect(api.generate(call, 60.0))
            runs += [c.start.engine_instance for c in chunks if c.HasField("start")]
            if runs[-1]:
                break
            await asyncio.sleep(0.01)
        assert runs[-1] == engine_run({"media_marker": MARKER}), runs
    finally:
        gate.set()
        await api.close()


async def _collect(chunks: AsyncIterator[model_pb2.GenerateChunk]) -> list[model_pb2.GenerateChunk]:
    return [c async for c in chunks]


async def test_a_props_answering_broken_json_leaves_every_call_answered_and_logs_once(
    serve: Callable[[Engine], Awaitable[Engine]], caplog: pytest.LogCaptureFixture
) -> None:
    """Before, a /props answering 200 with broken JSON failed every chat call UNAVAILABLE
    (the engine ejected) and left the opened chat stream unclosed."""

    async def props(_: web.Request) -> web.StreamResponse:
        return web.Response(text="{not json", content_type="application/json")

    engine = await serve(Engine(props))
    with caplog.at_level(logging.INFO, logger="cachemesh.model"):
        runs = await _starts(engine, 4)
    assert runs == [""] * 4
    lines = [r.getMessage() for r in caplog.records if "/props" in r.getMessage()]
    assert len(lines) == 1 and "JSONDecodeError" in lines[0], lines
    assert engine.base_url.split("/v1")[0].removeprefix("http://") in lines[0]


async def test_an_engine_without_props_is_not_asked_with_each_call(
    serve: Callable[[Engine], Awaitable[Engine]],
) -> None:
    """vLLM has no /props (404): before, each call asked it again (5 calls, 5 asks)."""

    async def props(_: web.Request) -> web.StreamResponse:
        return web.Response(status=404, text="not found")

    engine = await serve(Engine(props))
    assert await _starts(engine, 5) == [""] * 5
    assert engine.props_asked == 1


async def test_the_refresh_is_due_once_a_second_and_seldom_for_an_engine_without_props(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = ManualClock()
    answers: list[str | Exception] = ["run-1", RuntimeError("refused"), "run-2", NoProps(), "x"]
    asked = 0

    async def fetch() -> str:
        nonlocal asked
        answer = answers[asked]
        asked += 1
        if isinstance(answer, Exception):
            raise answer
        return answer

    def seconds() -> float:
        return clock.now_ms() / 1000

    async def refresh() -> None:
        started = run.refresh_if_due()
        if started is not None:
            await started

    run = EngineRun(fetch, "engine:1", seconds)
    with caplog.at_level(logging.INFO, logger="cachemesh.model"):
        await refresh()
        assert (asked, run.run) == (1, "run-1")
        clock.advance(s=0.5)
        await refresh()
        assert asked == 1  # not due yet
        clock.advance(s=0.5)
        await refresh()
        assert (asked, run.run) == (2, "")  # failed: not known
        clock.advance(s=1)
        await refresh()
        assert (asked, run.run) == (3, "run-2")
        clock.advance(s=1)
        await refresh()
        assert (asked, run.run) == (4, "")  # no /props
        clock.advance(s=299)
        await refresh()
        assert asked == 4
        clock.advance(s=1)
        await refresh()
        assert (asked, run.run) == (5, "x")
    await run.close()
    words = [r.getMessage() for r in caplog.records]
    assert len(words) == 5, words  # each change of state once


async def test_a_hung_refresh_is_bounded_in_all(monkeypatch: pytest.MonkeyPatch) -> None:
    """A /props trickling a byte within each read's timeout (34.7 s before): the refresh
    gives up at its bound; the run is not known."""
    hung = asyncio.Event()

    async def fetch() -> str:
        await hung.wait()
        return "never"

    run = EngineRun(fetch, "engine:1", bound_s=0.01)
    run.run = "stale"
    started = run.refresh_if_due()
    assert started is not None
    await asyncio.wait_for(started, 60.0)  # a hang guard only
    assert run.run == ""
    await run.close()


async def test_one_refresh_at_a_time_and_close_cancels_the_one_in_flight() -> None:
    """A fetch that has not returned when the next refresh falls due (1.5 s later): no second
    fetch starts beside it (without the guard two ran at once, and close() kept the second's
    handle only: the first was left running), and close() cancels the one in flight."""
    clock = ManualClock()
    started = 0
    cancelled = 0
    never, entered = asyncio.Event(), asyncio.Event()

    async def fetch() -> str:
        nonlocal started, cancelled
        started += 1
        entered.set()
        try:
            await never.wait()
        except asyncio.CancelledError:
            cancelled += 1
            raise
        return "never"

    run = EngineRun(fetch, "engine:1", lambda: clock.now_ms() / 1000, bound_s=3600.0)
    first = run.refresh_if_due()
    assert first is not None
    await asyncio.wait_for(entered.wait(), 60.0)  # the fetch runs (a hang guard only)
    clock.advance(s=1.5)  # due again, the first still in flight
    assert run.refresh_if_due() is None
    for _ in range(5):  # a second fetch, had one been started, would have begun by now
        await asyncio.sleep(0)
    assert started == 1 and not first.done()
    await run.close()
    assert first.cancelled() and cancelled == 1
