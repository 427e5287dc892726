"""The HTTP front process (``serve``) in front of a fake Gateway on real gRPC: what the stack's
simulator never does (tool_use answers, refusals, long waits, a caller that goes away), driven
by the official SDKs and by plain HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import grpc
import openai
import pytest
from openai.types.chat.completion_create_params import CompletionCreateParamsBase

from cachemesh.retry_info import CONTEXT_WINDOW, REQUEST_ID_KEY
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import gateway_pb2_grpc
from services.common.auth import hash_key
from services.common.channels import server_options
from services.common.env import ConfigError, Env
from services.common.errors import Code
from services.common.retry_info import refusal_trailers
from services.http_front import (
    anthropic_api,
    facts,
    gateway,
    handlers,
    openai_api,
    stopping,
)
from services.http_front.app import serve
from services.http_front.errors import ApiError
from services.http_front.openai_api import parse_request
from services.http_front.settings import HttpFrontSettings
from services.tools.stack.ports import free_port

KEY = "cm_test-key-of-tenant-a"
Context = grpc.aio.ServicerContext[Any, Any]


def _answer(*blocks: pb.ContentBlock, stop: str = "end_turn") -> pb.CompleteResponse:
    return pb.CompleteResponse(
        content=blocks,
        served_by=pb.LAYER_MODEL,
        model="sim-large",
        tier="large",
        stop_reason=stop,
        request_id="req1",
        trace_id="ab" * 16,
        usage=pb.Usage(input_tokens=12, output_tokens=4),
        cost=pb.Cost(cost_nanos=100, baseline_nanos=100),
    )


TOOL_ANSWER = _answer(
    pb.ContentBlock(text="Checking."),
    pb.ContentBlock(tool_use=pb.ToolUse(id="toolu_1", name="lookup", input_json='{"id":"X1"}')),
    stop="tool_use",
)


@dataclass
class FakeGateway(gateway_pb2_grpc.GatewayServicer):
    """Answers with ``answer`` (or aborts with ``refuse``); ``hold`` keeps a call waiting."""

    answer: pb.CompleteResponse = field(default_factory=lambda: TOOL_ANSWER)
    refuse: tuple[grpc.StatusCode, str, tuple[tuple[str, str | bytes], ...]] | None = None
    pause_s: float = 0.0  # between a stream's start and the rest
    hold: asyncio.Event | None = None
    calls: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    metadata: list[tuple[str, str]] = field(default_factory=list)
    cut: str = ""  # a stream cut after its first block, UNAVAILABLE with this message
    received: pb.CompleteRequest | None = None  # the last request

    async def _begin(self, context: Context) -> None:
        """As the router: no initial metadata before the answer or the first message (a header
        from the server commits a gRPC call), so a held call has sent nothing."""
        self.calls += 1
        self.metadata = [(k, str(v)) for k, v in context.invocation_metadata() or ()]
        self.arrived.set()
        if self.hold is not None:
            await self.hold.wait()
        if self.refuse is not None:
            code, message, trailers = self.refuse
            context.set_trailing_metadata(trailers)
            await context.abort(code, message)

    async def Complete(self, request: pb.CompleteRequest, context: Context) -> pb.CompleteResponse:
        self.received = request
        await self._begin(context)
        return self.answer

    async def StreamComplete(
        self, request: pb.CompleteRequest, context: Context
    ) -> AsyncIterator[pb.CompleteChunk]:
        self.received = request
        await self._begin(context)
        head = pb.CompleteResponse(request_id="req1", model="sim-large", served_by=pb.LAYER_MODEL)
        yield pb.CompleteChunk(start=head)
        try:
            await asyncio.sleep(self.pause_s)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        for block in self.answer.content:
            yield pb.CompleteChunk(delta=block)
            if self.cut:
                await context.abort(grpc.StatusCode.UNAVAILABLE, self.cut)
        yield pb.CompleteChunk(end=self.answer)


@dataclass
class Served:
    base: str
    stop: asyncio.Event  # SIGTERM's effect
    metrics: str  # the front's GET /metrics
    gateway_server: grpc.aio.Server | None = field(default=None, kw_only=True)  # the fake's


@dataclass
class Front(Served):
    gateway: FakeGateway = field(default_factory=FakeGateway)
    # the SDK clients a test made: closed with it (left to the GC, an SDK client closes itself
    # on whichever loop then runs, and a later test logs the closed loop's error)
    clients: list[anthropic.AsyncAnthropic | openai.AsyncOpenAI] = field(default_factory=list)


@contextlib.asynccontextmanager
async def serving(
    tmp_path: Path, gateway: gateway_pb2_grpc.GatewayServicer, **env_over: str
) -> AsyncIterator[Served]:
    """The front process in front of ``gateway`` on real gRPC; ``env_over`` overrides its env."""
    # the front keepalive-pings its Gateway: accepted, as the router does; whatever size the
    # front sends, the fake takes
    big = [("grpc.max_receive_message_length", 64 << 20)]
    server = grpc.aio.server(options=[*big, *server_options()])
    gateway_pb2_grpc.add_GatewayServicer_to_server(gateway, server)
    gateway_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    keys = tmp_path / "api-keys"
    keys.write_text(f"tenant-a:{hash_key(KEY)}\n")
    port, metrics_port = free_port(), free_port()
    env = {
        "HTTP_FRONT_LISTEN": f"127.0.0.1:{port}",
        "HTTP_FRONT_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
        "HTTP_FRONT_GATEWAY_ADDR": f"127.0.0.1:{gateway_port}",
        "CACHEMESH_API_KEYS_FILE": str(keys),
        "MODEL_REPLICAS": "sim-small=127.0.0.1:1,sim-large=127.0.0.1:1",
        "HTTP_FRONT_MAX_IN_FLIGHT_PER_KEY": "1",
        "HTTP_FRONT_MAX_BODY_BYTES": "4096",
        # a stream's head waits for the Gateway's start this long (then pings): far longer
        # than any test's refusal or answer takes on a loaded machine, so a test of a stream's
        # status or head is not raced by an early head; the tests of that early head and its
        # pings ask for 50 ms (``pinging``)
        "HTTP_FRONT_PING_S": "60",
        "OTEL_TRACES_EXPORTER": "none",
        "CACHEMESH_GRACE_S": "1",
        **env_over,
    }
    stop = asyncio.Event()
    task = asyncio.ensure_future(serve(env, stop))
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            try:
                async with session.get(f"{base}/healthz") as reply:
                    if reply.status == 200:
                        break
            except aiohttp.ClientError:
                await asyncio.sleep(0.02)
    try:
        yield Served(base, stop, f"http://127.0.0.1:{metrics_port}/metrics", gateway_server=server)
    finally:
        stop.set()
        await task
        await server.stop(0)


@contextlib.asynccontextmanager
async def _fronting(tmp_path: Path, **env_over: str) -> AsyncIterator[Front]:
    fake = FakeGateway()
    async with serving(tmp_path, fake, **env_over) as served:
        made = Front(served.base, served.stop, served.metrics, fake)
        yield made
        for client in made.clients:
            await client.close()


@pytest.fixture
async def front(tmp_path: Path) -> AsyncIterator[Front]:
    """The front before a ``FakeGateway``; a stream's head waits for the Gateway's start."""
    async with _fronting(tmp_path) as made:
        yield made


@pytest.fixture
async def pinging(tmp_path: Path) -> AsyncIterator[Front]:
    """``front`` with HTTP_FRONT_PING_S at 50 ms: a stream the Gateway is silent on has its
    head and pings before its start, and pings between its chunks."""
    async with _fronting(tmp_path, HTTP_FRONT_PING_S="0.05") as made:
        yield made


def _claude(front: Front) -> anthropic.AsyncAnthropic:
    client = anthropic.AsyncAnthropic(base_url=front.base, api_key=KEY, max_retries=0)
    front.clients.append(client)
    return client


def _gpt(front: Front) -> openai.AsyncOpenAI:
    client = openai.AsyncOpenAI(base_url=f"{front.base}/v1", api_key=KEY, max_retries=0)
    front.clients.append(client)
    return client


ASK: list[Any] = [{"role": "user", "content": "Where is X1?"}]
HI = b'[{"role": "user", "content": "hi"}]}'


async def test_a_tool_use_answer_reaches_both_sdks(front: Front) -> None:
    message = await _claude(front).messages.create(model="sim-large", max_tokens=50, messages=ASK)
    assert message.stop_reason == "tool_use"
    use = message.content[1]
    assert use.type == "tool_use" and use.name == "lookup" and use.input == {"id": "X1"}
    completion = await _gpt(front).chat.completions.create(model="sim-large", messages=ASK)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "lookup"
    assert call.function.arguments == '{"id":"X1"}'


async def test_the_sdks_automatic_caching_marks_the_last_block(front: Front) -> None:
    await _claude(front).messages.create(
        model="sim-large",
        max_tokens=50,
        messages=[
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"},
            *ASK,
        ],
        cache_control={"type": "ephemeral", "ttl": "1h"},
    )
    assert front.gateway.received is not None
    marked = [m.content[-1].HasField("cache_control") for m in front.gateway.received.messages]
    assert marked == [False, False, True]
    assert front.gateway.received.messages[-1].content[-1].cache_control.ttl == pb.CACHE_TTL_1H


async def test_a_streamed_tool_use_reaches_both_sdks(front: Front) -> None:
    async with _claude(front).messages.stream(model="sim-large", max_tokens=50, messages=ASK) as s:
        message = await s.get_final_message()
    assert [b.type for b in message.content] == ["text", "tool_use"]
    assert message.content[1].input == {"id": "X1"}  # type: ignore[union-attr]
    stream = await _gpt(front).chat.completions.create(model="sim-large", messages=ASK, stream=True)
    calls = [c.choices[0].delta.tool_calls async for c in stream if c.choices]
    named = [c[0].function.name for c in calls if c and c[0].function]
    assert named == ["lookup"]


async def test_a_streamed_messages_final_usage_is_the_billed_one(front: Front) -> None:
    """message_start carries the usage known before the answer (Anthropic's own says
    ``output_tokens`` 1 there, a running count; the front's start says 0); message_delta
    carries the billed counts, which the SDK's accumulator writes over the start's. The
    streamed message's final counts are the non-streamed one's, whatever the start said (its
    ``cache_creation`` split stays as message_start left it: ``EventStream.start``)."""
    claude = _claude(front)
    whole = await claude.messages.create(model="sim-large", max_tokens=50, messages=ASK)
    async with claude.messages.stream(model="sim-large", max_tokens=50, messages=ASK) as s:
        started = [e async for e in s if e.type == "message_start"]
        streamed = await s.get_final_message()
    assert started[0].message.usage.output_tokens == 0
    assert (whole.usage.input_tokens, whole.usage.output_tokens) == (12, 4)  # the Gateway's
    for name in (
        "input_tokens",
        "output_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
    ):
        assert getattr(streamed.usage, name) == getattr(whole.usage, name), name


async def test_the_openai_tool_loop_sends_the_stream_helpers_message_back(front: Front) -> None:
    """``messages.append(completion.choices[0].message)``: the message the SDK's stream helper
    returns carries fields of an answer (parsed, the calls' index and parsed_arguments)."""
    gpt = _gpt(front)
    tools: list[Any] = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    async with gpt.chat.completions.stream(model="sim-large", messages=ASK, tools=tools) as s:
        done = await s.get_final_completion()
    message = done.choices[0].message
    assert message.tool_calls is not None
    history = [*ASK, message, {"role": "tool", "tool_call_id": "toolu_1", "content": "Paris"}]
    again = await gpt.chat.completions.create(model="sim-large", messages=history, tools=tools)
    assert again.choices[0].finish_reason == "tool_calls" and front.gateway.calls == 2


async def test_a_failure_after_a_streams_head_ends_that_stream_with_an_error_event(
    front: Front, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Once the stream's head went out, a failure (here a bug in the translation) cannot be a
    response of its own: each SDK reads an error event in its API's shape instead."""

    def broken(*args: object) -> object:
        raise RuntimeError("a bug in the translation")

    monkeypatch.setattr(handlers, "_anthropic_events", broken)
    monkeypatch.setattr(handlers, "_openai_chunks", broken)
    with pytest.raises(anthropic.APIStatusError) as claude:
        async with _claude(front).messages.stream(
            model="sim-large", max_tokens=50, messages=ASK
        ) as s:
            await s.get_final_message()
    assert "the HTTP front failed on this request" in str(claude.value)
    stream = await _gpt(front).chat.completions.create(model="sim-large", messages=ASK, stream=True)
    with pytest.raises(openai.APIError) as gpt:
        _ = [c async for c in stream]
    assert "the HTTP front failed on this request" in str(gpt.value)
    assert "a bug in the translation" in caplog.text  # logged with its traceback


async def test_a_second_request_over_the_keys_limit_is_a_rate_limit_error(front: Front) -> None:
    front.gateway.hold = asyncio.Event()
    first = asyncio.ensure_future(
        _claude(front).messages.create(model="sim-large", max_tokens=50, messages=ASK)
    )
    await asyncio.wait_for(front.gateway.arrived.wait(), 5)
    with pytest.raises(anthropic.RateLimitError) as limited:
        await _claude(front).messages.create(model="sim-large", max_tokens=50, messages=ASK)
    assert limited.value.response.headers["retry-after"] == "1"
    with pytest.raises(openai.RateLimitError):
        await _gpt(front).chat.completions.create(model="sim-large", messages=ASK)
    front.gateway.hold.set()
    assert (await first).stop_reason == "tool_use"
    assert front.gateway.calls == 1


_A, _O = anthropic, openai
_REFUSALS = [
    (grpc.StatusCode.UNAVAILABLE, "no layer", (), _A.OverloadedError, _O.InternalServerError,
     (529, 503)),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", (("retry-after", "3"),), _A.RateLimitError,
     _O.RateLimitError, (429, 429)),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "too big", (), _A.RequestTooLargeError,
     _O.APIStatusError, (413, 413)),
    (grpc.StatusCode.INVALID_ARGUMENT, "max_tokens: must be > 0", (), _A.BadRequestError,
     _O.BadRequestError, (400, 400)),
    (grpc.StatusCode.UNAUTHENTICATED, "unknown API key", (), _A.AuthenticationError,
     _O.AuthenticationError, (401, 401)),
    (grpc.StatusCode.INTERNAL, "boom", (), _A.InternalServerError, _O.InternalServerError,
     (500, 500)),
]  # fmt: skip


@pytest.mark.parametrize(
    ("code", "message", "trailers", "claude_error", "gpt_error", "status"), _REFUSALS
)
async def test_gateway_refusals_are_each_sdks_exceptions(
    front: Front,
    code: grpc.StatusCode,
    message: str,
    trailers: tuple[tuple[str, str], ...],
    claude_error: type[anthropic.APIStatusError],
    gpt_error: type[openai.APIStatusError],
    status: tuple[int, int],
) -> None:
    front.gateway.refuse = (code, message, trailers)
    with pytest.raises(claude_error) as claude:
        await _claude(front).messages.create(model="sim-large", max_tokens=50, messages=ASK)
    assert claude.value.status_code == status[0] and message in claude.value.message
    with pytest.raises(gpt_error) as gpt:
        await _gpt(front).chat.completions.create(model="sim-large", messages=ASK, stream=True)
    assert gpt.value.status_code == status[1] and message in gpt.value.message
    if trailers:
        assert claude.value.response.headers["retry-after"] == "3"


async def test_a_budget_spent_until_midnight_is_not_retried_by_the_sdks(front: Front) -> None:
    """A 429 whose retry-after is hours (a spent daily budget: the seconds to 00:00 UTC) said
    nothing against retries, and the Anthropic SDK sleeps what retry-after says: its
    messages.create() slept 6,400 s, twice, instead of raising RateLimitError. A short wait
    (a rate limit's) stays retryable."""
    front.gateway.refuse = (grpc.StatusCode.RESOURCE_EXHAUSTED, "day budget spent",
                            (("retry-after", "6400"),))  # fmt: skip
    claude = anthropic.AsyncAnthropic(base_url=front.base, api_key=KEY)  # retries on
    gpt = openai.AsyncOpenAI(base_url=f"{front.base}/v1", api_key=KEY)
    front.clients += [claude, gpt]
    with pytest.raises(anthropic.RateLimitError) as refused:
        await asyncio.wait_for(claude.messages.create(model="sim-large", max_tokens=50,
                                                      messages=ASK), 30)  # fmt: skip
    assert refused.value.response.headers["retry-after"] == "6400"
    assert refused.value.response.headers["x-should-retry"] == "false"
    with pytest.raises(openai.RateLimitError):
        await gpt.chat.completions.create(model="sim-large", messages=ASK)
    assert front.gateway.calls == 2  # one each: no retry
    front.gateway.refuse = (grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down",
                            (("retry-after", "1"),))  # fmt: skip
    with pytest.raises(anthropic.RateLimitError) as limited:
        await _claude(front).messages.create(model="sim-large", max_tokens=50, messages=ASK)
    assert "x-should-retry" not in limited.value.response.headers


async def _raw(
    front: Front, path: str, body: bytes, headers: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{front.base}{path}", data=body, headers=headers) as reply,
    ):
        return reply.status, await reply.json()


# a string cut in the middle of an emoji: legal JSON, no text (was a 500, retried by the SDKs)
LONE_SURROGATE = (
    b'{"model": "sim-large", "max_tokens": 5, '
    b'"messages": [{"role": "user", "content": "smile \\ud83d"}]}'
)
# tool-call arguments nested deeper than Python's JSON reader goes (was a 500)
DEEP_ARGUMENTS = json.dumps(
    {
        "model": "sim-large",
        "messages": [
            {"role": "user", "content": "q"},
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "f", "arguments": "[" * 1000 + "]" * 1000},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "ok"},
        ],
    }
).encode()
# a request of 5,0xx bytes (the Gateway's measure: its text), over HTTP_FRONT_MAX_BODY_BYTES here
LONG = b'[{"role": "user", "content": "' + b"m" * 5000 + b'"}]}'
CLAUDE_HEADERS = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
GPT_HEADERS = {"authorization": f"Bearer {KEY}"}
# numbers Python's json reads but JSON has not (the provider SDKs then refuse to send the body;
# it reached the Gateway, which answered 529 / 503 "retry later")
NAN_SCHEMA = (
    b'{"model": "sim-large", "max_tokens": 5, "messages": [{"role": "user", "content": "q"}], '
    b'"tools": [{"name": "f", "input_schema": {"type": "object", "maximum": NaN}}]}'
)
INFINITE_PARAMETERS = (
    b'{"model": "sim-large", "messages": [{"role": "user", "content": "q"}], "tools": [{"type": '
    b'"function", "function": {"name": "f", "parameters": {"minimum": -Infinity}}}]}'
)
HUGE_NUMBER = NAN_SCHEMA.replace(b"NaN", b"1e999")
NAN_ARGUMENTS = DEEP_ARGUMENTS.replace(
    json.dumps("[" * 1000 + "]" * 1000).encode(), json.dumps('{"n": NaN}').encode()
)


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "kind"),
    [
        ("/v1/messages", b"{not json", CLAUDE_HEADERS, 400, "invalid_request_error"),
        ("/v1/messages", b'{"model": "m"}', {"anthropic-version": "2023-06-01"}, 401,
         "authentication_error"),
        ("/v1/messages", b'{"model": "m"}', {"x-api-key": KEY}, 400, "invalid_request_error"),
        ("/v1/messages", b'{"model": "sim-large", "max_tokens": 5, "messages": ' + LONG,
         CLAUDE_HEADERS, 413, "request_too_large"),
        ("/v1/chat/completions", b"[]", GPT_HEADERS, 400, "invalid_request_error"),
        ("/v1/chat/completions", b"{}", {"authorization": "Bearer cm_nope"}, 401,
         "invalid_request_error"),
        ("/v1/chat/completions", b'{"model": "sim-large", "messages": ' + LONG, GPT_HEADERS,
         413, "invalid_request_error"),
        ("/v1/messages", LONE_SURROGATE, CLAUDE_HEADERS, 400, "invalid_request_error"),
        ("/v1/chat/completions", LONE_SURROGATE, GPT_HEADERS, 400, "invalid_request_error"),
        ("/v1/messages", LONE_SURROGATE.decode().encode("utf-16"), CLAUDE_HEADERS, 400,
         "invalid_request_error"),
        ("/v1/chat/completions", DEEP_ARGUMENTS, GPT_HEADERS, 400, "invalid_request_error"),
        ("/v1/messages", NAN_SCHEMA, CLAUDE_HEADERS, 400, "invalid_request_error"),
        ("/v1/messages", HUGE_NUMBER, CLAUDE_HEADERS, 400, "invalid_request_error"),
        ("/v1/chat/completions", INFINITE_PARAMETERS, GPT_HEADERS, 400, "invalid_request_error"),
        ("/v1/chat/completions", NAN_ARGUMENTS, GPT_HEADERS, 400, "invalid_request_error"),
    ],
)  # fmt: skip
async def test_bad_input_is_refused_in_the_apis_shape_before_the_gateway(
    front: Front, path: str, body: bytes, headers: dict[str, str], status: int, kind: str
) -> None:
    got, reply = await _raw(front, path, body, headers)
    assert got == status
    error = reply["error"]
    assert error["type"] == kind and error["message"]
    if status == 413:  # the size, the limit, and the setting to raise: "at most 1,048,576 bytes"
        assert "too large: 5,0" in error["message"] and "at most 4,096 bytes" in error["message"]
        assert "HTTP_FRONT_MAX_BODY_BYTES" in error["message"]
    if path == "/v1/messages":
        assert reply["type"] == "error"
    assert front.gateway.calls == 0


TOOL: list[Any] = [{"name": "lookup", "input_schema": {"type": "object", "properties": {}}}]
FUNCTION: list[Any] = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]


# each was accepted with a 200 and dropped silently: the caller never learnt that its answer
# was not sampled, biased, seeded or kept to one tool call as asked
@pytest.mark.parametrize(
    ("api", "fields", "named"),
    [
        ("openai", {"tools": FUNCTION, "parallel_tool_calls": False}, "parallel_tool_calls"),
        ("openai", {"reasoning_effort": "minimal"}, "reasoning_effort"),
        ("openai", {"logit_bias": {"1": -100}}, "logit_bias"),
        ("openai", {"extra_body": {"logit_bias": "garbage"}}, "logit_bias"),
        ("openai", {"top_logprobs": 5}, "top_logprobs"),
        ("openai", {"seed": 7}, "seed"),
        ("openai", {"top_p": 0.1}, "top_p"),
        ("openai", {"frequency_penalty": 0.5}, "frequency_penalty"),
        ("openai", {"presence_penalty": -1}, "presence_penalty"),
        ("openai", {"extra_body": {"metadata": {"k": 1}}}, "metadata.k"),
        ("anthropic", {"tools": TOOL, "tool_choice": {"type": "auto",
                       "disable_parallel_tool_use": True}},
         "tool_choice.disable_parallel_tool_use"),
        ("anthropic", {"extra_body": {"tool_choice": {"type": "auto", "bogus": 1}}},
         "tool_choice.bogus"),
        ("anthropic", {"extra_body": {"top_k": 1}}, "top_k"),
        ("anthropic", {"extra_body": {"top_p": 0.1}}, "top_p"),
    ],
)  # fmt: skip
async def test_a_parameter_the_gateway_cannot_honour_is_refused_naming_it(
    front: Front, api: str, fields: dict[str, Any], named: str
) -> None:
    with pytest.raises((anthropic.BadRequestError, openai.BadRequestError)) as refused:
        if api == "openai":
            await _gpt(front).chat.completions.create(model="sim-large", messages=ASK, **fields)
        else:
            await _claude(front).messages.create(
                model="sim-large", max_tokens=50, messages=ASK, **fields
            )
    error = refused.value
    assert isinstance(error, anthropic.BadRequestError | openai.BadRequestError)
    body: Any = error.body
    said = body["error"]["message"] if api == "anthropic" else body["message"]
    assert said.startswith(f"{named}: ")
    assert error.response.headers["x-should-retry"] == "false"
    if isinstance(error, openai.BadRequestError):
        assert error.param == named
    assert front.gateway.calls == 0


async def test_a_parameter_at_its_default_value_changes_nothing_and_is_accepted(
    front: Front,
) -> None:
    """What the provider would do without the field (OpenAI's parallel tool calls, top_p 1,
    no penalty, no bias): nothing is dropped, so it is served."""
    await _gpt(front).chat.completions.create(
        model="sim-large", messages=ASK, tools=FUNCTION, parallel_tool_calls=True, top_p=1,
        frequency_penalty=0, presence_penalty=0, logit_bias={}, metadata={"app": "docs"},
    )  # fmt: skip
    await _claude(front).messages.create(
        model="sim-large", max_tokens=50, messages=ASK, tools=TOOL, extra_body={"top_p": 1},
        tool_choice={"type": "auto", "disable_parallel_tool_use": False},
        extra_headers=OLD_VERSION,  # 2026-10-21 refuses top_p: the next test
    )  # fmt: skip
    assert front.gateway.calls == 2


OLD_VERSION = {"anthropic-version": "2023-06-01"}


async def test_anthropic_version_2026_10_21_refuses_temperature_as_anthropic_does(
    front: Front,
) -> None:
    """The SDK's own version (2.x: 2026-10-21) has no sampling parameters: Anthropic refuses
    temperature, top_p, top_k sent anyway (extra_body), at their defaults too, as unknown
    fields; under 2023-06-01 the same body is served (the front took them under every
    version, so a caller met the 400 first at the real API)."""
    claude = _claude(front)
    with pytest.raises(anthropic.BadRequestError) as refused:
        await claude.messages.create(
            model="sim-large", max_tokens=50, messages=ASK, extra_body={"temperature": 1}
        )
    body: Any = refused.value.body
    assert body["error"]["message"] == "temperature: Extra inputs are not permitted"
    assert front.gateway.calls == 0
    await claude.messages.create(
        model="sim-large", max_tokens=50, messages=ASK, extra_body={"temperature": 1},
        extra_headers=OLD_VERSION,
    )  # fmt: skip
    assert front.gateway.calls == 1


# thinking: {"type": "disabled"} was accepted and dropped: the Gateway has no thinking field, so
# a model that thinks unless told not to (Claude Sonnet 5, Opus 5, gpt-5) thought anyway, and
# the caller paid for that thinking as output. To a model that does not think by default it
# changes nothing, and is served.
THINKERS = "claude-sonnet-5=127.0.0.1:1,claude-haiku-4-5=127.0.0.1:1,sim-small=127.0.0.1:1"


@pytest.mark.parametrize(
    ("model", "auto_large", "refused"),
    [
        ("claude-sonnet-5", "sim-large", True),
        ("auto", "claude-sonnet-5", True),  # auto may pick it
        ("claude-haiku-4-5", "sim-large", False),
        ("auto", "sim-large", False),
    ],
)
async def test_thinking_disabled_is_refused_for_a_model_that_thinks_by_default(
    tmp_path: Path, model: str, auto_large: str, refused: bool
) -> None:
    fake = FakeGateway()
    replicas = f"{THINKERS},{auto_large}=127.0.0.1:1" if auto_large == "sim-large" else THINKERS
    over = {"MODEL_REPLICAS": replicas, "CACHEMESH_AUTO_LARGE": auto_large}
    async with serving(tmp_path, fake, **over) as served:
        client = anthropic.AsyncAnthropic(base_url=served.base, api_key=KEY, max_retries=0)
        async with client:
            ask = client.messages.create(
                model=model, max_tokens=50, messages=ASK, thinking={"type": "disabled"}
            )
            if not refused:
                await ask
                assert fake.calls == 1
                return
            with pytest.raises(anthropic.BadRequestError) as error:
                await ask
    said = error.value.body["error"]["message"]  # type: ignore[index]
    assert said.startswith("thinking.type: ")
    assert f"for {model}, which" in said and "thinks by default" in said
    assert "omit thinking" in said
    assert error.value.response.headers["x-should-retry"] == "false"
    assert fake.calls == 0


async def test_a_body_under_raised_limits_reaches_the_gateway(tmp_path: Path) -> None:
    # the front's channel was fixed at 4 MiB: with HTTP_FRONT_MAX_BODY_BYTES and
    # CACHEMESH_MAX_MESSAGE_BYTES at 8 and 16 MiB a 5 MB body was a 413 quoting gRPC's
    # "CLIENT: Sent message larger than max"
    fake = FakeGateway()
    limits = {
        "HTTP_FRONT_MAX_BODY_BYTES": str(8 << 20),
        "CACHEMESH_MAX_MESSAGE_BYTES": str(16 << 20),
    }
    async with serving(tmp_path, fake, **limits) as served:
        text = "x" * 5_000_000
        body = {
            "model": "sim-large",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": text}],
        }
        front = Front(served.base, served.stop, served.metrics, fake)
        status, _ = await _raw(front, "/v1/messages", json.dumps(body).encode(), CLAUDE_HEADERS)
    assert status == 200
    assert fake.received is not None and fake.received.messages[0].content[0].text == text


def test_a_body_limit_over_the_message_limit_is_refused_naming_both() -> None:
    replicas = "sim-small=127.0.0.1:1,sim-large=127.0.0.1:1"
    env = {"MODEL_REPLICAS": replicas, "CACHEMESH_API_KEYS_FILE": "/dev/null"}
    with pytest.raises(ConfigError) as refused:
        HttpFrontSettings.from_env({**env, "HTTP_FRONT_MAX_BODY_BYTES": str(8 << 20)})
    message = str(refused.value)
    assert "HTTP_FRONT_MAX_BODY_BYTES (8388608)" in message
    assert "CACHEMESH_MAX_MESSAGE_BYTES (4194304)" in message
    lowered = HttpFrontSettings.from_env({**env, "CACHEMESH_MAX_MESSAGE_BYTES": str(1 << 19)})
    assert lowered.max_message_bytes == 1 << 19
    assert lowered.max_body_bytes == 1 << 18  # the Gateway's own default: half that limit


@pytest.mark.parametrize("message_bytes", [1 << 19, 1 << 20, 3 << 20, 4 << 20, 64 << 20])
def test_the_fronts_default_body_limit_is_the_gateways_default_request_limit(
    message_bytes: int,
) -> None:
    """At a lowered message limit the front's default took bodies up to the limit while the
    router's took half: a body between got a 413 quoting gRPC's "Received message larger than
    max" from the Gateway."""
    from services.router.settings import max_request_bytes

    limit = {"CACHEMESH_MAX_MESSAGE_BYTES": str(message_bytes)}
    replicas = "sim-small=127.0.0.1:1,sim-large=127.0.0.1:1"
    env = {"MODEL_REPLICAS": replicas, "CACHEMESH_API_KEYS_FILE": "/dev/null", **limit}
    front = HttpFrontSettings.from_env(env)
    assert front.max_body_bytes == max_request_bytes(Env(limit), message_bytes)


async def _raw_headers(front: Front, headers: list[tuple[str, bytes]]) -> tuple[int, bytes]:
    """A POST /v1/messages whose header values are sent as the given bytes (a latin-1 client:
    Python's http.client encodes header values so)."""
    body = (
        b'{"model": "sim-large", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}'
    )
    host, port = front.base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += b"anthropic-version: 2023-06-01\r\nConnection: close\r\n"
    head += b"Content-Length: " + str(len(body)).encode() + b"\r\n"
    for name, value in headers:
        head += name.encode() + b": " + value + b"\r\n"
    writer.write(head + b"\r\n" + body)
    await writer.drain()
    reply = await reader.read()
    writer.close()
    status = int(reply.split(b" ", 2)[1])
    return status, reply.partition(b"\r\n\r\n")[2]


# an unknown route or method was aiohttp's plain-text 404/405, which each SDK reported as an
# error with no message (openai: "Error code: 404"), and a model id with a slash (an open
# model's ``org/name``) never reached the model lookup
@pytest.mark.parametrize(
    ("method", "path", "headers", "status", "shape"),
    [
        ("POST", "/v1/completions", {}, 404, "openai"),
        ("POST", "/v1/messages/batches", {"anthropic-version": "2023-06-01"}, 404, "anthropic"),
        ("GET", "/v1/chat/completions", {}, 405, "openai"),
        ("GET", "/v1/messages", {}, 405, "anthropic"),
        ("GET", "/v1/models/meta-llama/Llama-3-8B", {}, 404, "openai"),
        ("GET", "/v1/models/meta-llama/Llama-3-8B", {"anthropic-version": "2023-06-01"}, 404,
         "anthropic"),
    ],
)  # fmt: skip
async def test_an_unknown_route_or_model_is_an_error_in_the_apis_shape(
    front: Front, method: str, path: str, headers: dict[str, str], status: int, shape: str
) -> None:
    headers = {"authorization": f"Bearer {KEY}", "x-api-key": KEY, **headers}
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, f"{front.base}{path}", headers=headers) as reply,
    ):
        assert reply.status == status
        assert reply.content_type == "application/json"
        body = await reply.json()
    error = body["error"]
    assert path.rsplit("/", 1)[-1] in error["message"] or method in error["message"]
    if shape == "anthropic":
        assert body["type"] == "error" and error["type"].endswith("_error")
    else:
        assert error["type"] == "invalid_request_error" and "param" in error
    assert front.gateway.calls == 0


async def test_the_sdks_raise_their_not_found_error_with_the_fronts_message(front: Front) -> None:
    with pytest.raises(openai.NotFoundError, match="POST /v1/completions"):
        await _gpt(front).completions.create(model="sim-large", prompt="hi")
    with pytest.raises(anthropic.NotFoundError, match="'meta-llama/x' not found"):
        await _claude(front).models.retrieve("meta-llama/x")


@pytest.mark.parametrize(
    ("headers", "status", "kind"),
    [
        ([("x-api-key", KEY.encode() + b"\xe9")], 401, b"authentication_error"),
        ([("x-api-key", KEY.encode()), ("x-cachemesh-namespace", b"caf\xe9")], 400,
         b"x-cachemesh-namespace: not UTF-8 text"),
        ([("x-api-key", KEY.encode()), ("idempotency-key", b"r\xe9q-1")], 400,
         b"idempotency-key: not UTF-8 text"),
        # UTF-8 text was taken, and its response's request-id header carried its bytes, which
        # the SDKs' clients read as latin-1: 'r\xc3\xa9q-1' shown as 'rÃ©q-1'
        ([("x-api-key", KEY.encode()), ("idempotency-key", "réq-1".encode())], 400,
         b"idempotency-key: printable ASCII characters only"),
    ],
)  # fmt: skip
async def test_header_bytes_that_are_not_utf8_are_a_4xx_not_a_500(
    front: Front, headers: list[tuple[str, bytes]], status: int, kind: bytes
) -> None:
    got, body = await _raw_headers(front, headers)
    assert got == status and kind in body
    assert front.gateway.calls == 0


@pytest.mark.parametrize(
    "headers",
    [
        [("x-api-key", KEY), ("x-api-key", "cm_someone_else")],  # the first was read: served
        [("x-api-key", "cm_someone_else"), ("x-api-key", KEY)],
        [("authorization", f"Bearer {KEY}"), ("authorization", "Bearer cm_someone_else")],
    ],
)
async def test_an_api_key_header_sent_twice_is_refused(
    front: Front, headers: list[tuple[str, str]]
) -> None:
    got, body = await _raw_headers(front, [(name, value.encode()) for name, value in headers])
    assert got == 401 and b"authentication_error" in body and b"sent 2 times" in body
    assert KEY.encode() not in body and b"someone_else" not in body
    assert front.gateway.calls == 0


async def test_a_long_wait_in_a_stream_sends_pings(pinging: Front) -> None:
    pinging.gateway.pause_s = 0.3
    body = b'{"model": "sim-large", "max_tokens": 50, "stream": true, "messages": ' + HI
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{pinging.base}/v1/messages", data=body, headers=CLAUDE_HEADERS) as reply,
    ):
        text = (await reply.read()).decode()
    events = [
        line.removeprefix("event: ") for line in text.splitlines() if line.startswith("event:")
    ]
    # the wait after the start is pinged (a start later than the fixture's 50 ms HTTP_FRONT_PING_S
    # on a loaded machine has pings before it too: the slow-start test's path)
    started = events.index("message_start")
    assert set(events[:started]) <= {"ping"} and events[started + 1] == "ping"
    assert events[-1] == "message_stop" and "content_block_start" in events


async def test_a_caller_that_disconnects_mid_stream_cancels_the_gateway_call(
    pinging: Front, caplog: pytest.LogCaptureFixture
) -> None:
    """The next ping's write fails: the call is cancelled, and no error is logged (the pacer
    closes before the call it reads, so the write's error is the one that ends the request)."""
    pinging.gateway.pause_s = 30
    body = (
        b'{"model": "sim-large", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'
    )
    async with aiohttp.ClientSession() as session:
        reply = await session.post(
            f"{pinging.base}/v1/chat/completions", data=body, headers=GPT_HEADERS
        )
        # the Gateway pauses after its start (a start later than 50 ms on a loaded machine has
        # pings before it)
        *_, first = await asyncio.wait_for(_lines_until(reply, b"data: "), 10)
        assert b'"role":"assistant"' in first  # not held back
        reply.close()  # the caller goes away
    await asyncio.wait_for(pinging.gateway.cancelled.wait(), 5)
    await asyncio.sleep(0.2)  # the handler's own end
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


async def test_the_key_and_the_trace_go_to_the_gateway(front: Front) -> None:
    parent = "00-" + "c" * 32 + "-" + "d" * 16 + "-01"
    headers = {**CLAUDE_HEADERS, "traceparent": parent}
    body = (
        b'{"model": "sim-large", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}'
    )
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{front.base}/v1/messages", data=body, headers=headers) as reply,
    ):
        assert reply.status == 200
        returned = reply.headers["traceparent"]
    sent = dict(front.gateway.metadata)
    assert sent["authorization"] == f"Bearer {KEY}"
    assert sent["traceparent"] == returned and returned.startswith("00-" + "c" * 32)


async def test_only_a_request_with_an_idempotency_key_is_marked_as_a_possible_retry(
    front: Front,
) -> None:
    """The router reads the ledger for calls marked ``cachemesh-retry`` (a first call so marked
    is served as usual, at the cost of one ledger read); a request without a key has a fresh
    id each time, which no ledger can hold, so it goes unmarked."""
    claude = _claude(front)
    await claude.messages.create(model="sim-large", max_tokens=5, messages=ASK)
    assert "cachemesh-retry" not in dict(front.gateway.metadata)
    await claude.messages.create(
        model="sim-large",
        max_tokens=5,
        messages=ASK,
        extra_headers={"Idempotency-Key": "order-42"},
    )
    assert dict(front.gateway.metadata)["cachemesh-retry"] == "1"


async def test_readiness_follows_the_gateway(front: Front) -> None:
    async with aiohttp.ClientSession() as session, session.get(f"{front.base}/readyz") as reply:
        assert reply.status == 503  # the fake serves no grpc.health.v1: not ready
    async with aiohttp.ClientSession() as session, session.get(f"{front.base}/healthz") as reply:
        assert reply.status == 200


async def test_a_drain_lets_the_request_in_flight_finish_and_takes_no_new_one(front: Front) -> None:
    front.gateway.hold = asyncio.Event()
    first = asyncio.ensure_future(
        _claude(front).messages.create(model="sim-large", max_tokens=50, messages=ASK)
    )
    await asyncio.wait_for(front.gateway.arrived.wait(), 5)
    front.stop.set()
    await asyncio.sleep(0.2)
    with pytest.raises(anthropic.APIConnectionError):
        await _claude(front).messages.create(model="sim-large", max_tokens=50, messages=ASK)
    front.gateway.hold.set()
    assert (await first).stop_reason == "tool_use"


async def _on(writer: asyncio.StreamWriter, reader: asyncio.StreamReader, head: bytes) -> bytes:
    """One request (``head`` and its body) on an open connection; its whole answer."""
    writer.write(head)
    await writer.drain()
    answer = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in answer.lower().split(b"\r\n")
        if line.startswith(b"content-length:")
    )
    return answer + await reader.readexactly(length)


def _post(path: str, body: bytes, headers: dict[str, str]) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: front\r\nContent-Type: application/json\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


async def test_a_model_request_in_the_drains_open_window_is_refused_before_the_gateway(
    tmp_path: Path,
) -> None:
    """For the drain's first second the front still answers the keep-alive connections it had
    open (each answer closing its connection). A model request sent on one then was started
    and, running past the grace, cut: a provider's bill, and the caller's retry a second one
    (a review's probe: 1 started, 1 cut). It is refused before the Gateway instead, 529 / 503
    with a retry-after (both SDKs retry it) and Connection: close; the GETs are answered."""
    fake = FakeGateway()
    async with serving(tmp_path, fake, CACHEMESH_GRACE_S="5") as served:
        host, port = served.base.removeprefix("http://").split(":")
        opened = [await asyncio.open_connection(host, int(port)) for _ in range(4)]
        try:
            for reader, writer in opened:  # each an idle keep-alive connection
                idle = await _on(writer, reader, b"GET /healthz HTTP/1.1\r\nHost: front\r\n\r\n")
                assert idle.startswith(b"HTTP/1.1 200") and b"connection: close" not in idle.lower()
            served.stop.set()
            await asyncio.sleep(0.1)  # the drain has begun, its open window not over
            asked = [
                _post("/v1/messages", b'{"model": "sim-large", "max_tokens": 5, "messages": ' + HI,
                      CLAUDE_HEADERS),
                _post("/v1/chat/completions",
                      b'{"model": "sim-large", "stream": true, "messages": ' + HI, GPT_HEADERS),
                f"GET /v1/models HTTP/1.1\r\nHost: front\r\nauthorization: Bearer {KEY}\r\n"
                "\r\n".encode(),
                b"GET /healthz HTTP/1.1\r\nHost: front\r\n\r\n",
            ]  # fmt: skip
            answers = []
            for (reader, writer), head in zip(opened, asked, strict=True):
                writer.write(head)
                await writer.drain()
                # the whole answer, up to its connection's close (a connection kept open: a
                # timeout here)
                answers.append(await asyncio.wait_for(reader.read(), 10))
        finally:
            for _, writer in opened:
                writer.close()
    assert fake.calls == 0  # was 2: both model requests reached the Gateway
    claude, gpt, models, health = answers
    assert claude.startswith(b"HTTP/1.1 529") and gpt.startswith(b"HTTP/1.1 503")
    for refused in (claude, gpt):
        head = refused.lower()
        assert b"connection: close" in head
        assert f"retry-after: {stopping.DRAIN_RETRY_AFTER_S}\r\n".encode() in head
        assert b"x-should-retry" not in head  # both SDKs retry it
        assert b"not sent to the Gateway" in refused
    assert json.loads(claude.partition(b"\r\n\r\n")[2])["error"]["type"] == "overloaded_error"
    assert json.loads(gpt.partition(b"\r\n\r\n")[2])["error"]["code"] == "overloaded"
    for served_get in (models, health):
        assert served_get.startswith(b"HTTP/1.1 200") and b"connection: close" in served_get.lower()


async def test_a_request_cut_at_the_end_of_the_grace_is_answered_and_retryable(
    tmp_path: Path,
) -> None:
    """A non-streaming request still waiting on the Gateway when the front's grace ran out had
    its connection closed: both SDKs retry a closed connection, and the retry, on another
    front or the restarted one, was a new model call. It is answered instead (529 / 503),
    but the front cannot tell whether the call reached a model: one still queued (prefill
    queue, single-flight or ledger wait) was answered x-should-retry: false, "billed", while
    the router's access line said CANCELLED, no cost: the request was lost (a review's live
    repro, grace_cut.py: 1 attempt, x-should-retry: false). The cut stays retryable, with a
    retry-after the SDKs wait before retrying on the restarted front, and its message says a
    model call of it MAY have been billed."""
    fake = FakeGateway(hold=asyncio.Event())  # the Gateway answers after the grace (1 s)
    async with serving(tmp_path, fake, HTTP_FRONT_MAX_IN_FLIGHT_PER_KEY="4") as served:
        # no retries here: the front is gone once the grace is over (the headers tell)
        claude = anthropic.AsyncAnthropic(base_url=served.base, api_key=KEY, max_retries=0)
        gpt = openai.AsyncOpenAI(base_url=f"{served.base}/v1", api_key=KEY, max_retries=0)
        by_claude = asyncio.ensure_future(
            claude.messages.create(model="sim-large", max_tokens=50, messages=ASK)
        )
        by_gpt = asyncio.ensure_future(gpt.chat.completions.create(model="sim-large", messages=ASK))
        async with asyncio.timeout(5):
            while fake.calls < 2:  # both at the Gateway
                fake.arrived.clear()
                await fake.arrived.wait()
        served.stop.set()
        try:
            with pytest.raises(anthropic.APIStatusError) as claude_cut:
                await asyncio.wait_for(by_claude, 10)
            with pytest.raises(openai.APIStatusError) as gpt_cut:
                await asyncio.wait_for(by_gpt, 10)
        finally:
            fake.hold.set()  # type: ignore[union-attr]
            await claude.close()
            await gpt.close()
    assert claude_cut.value.status_code == 529 and gpt_cut.value.status_code == 503
    for error in (claude_cut.value, gpt_cut.value):
        assert "x-should-retry" not in error.response.headers  # both SDKs retry it
        assert error.response.headers["retry-after"] == str(stopping.CUT_RETRY_AFTER_S)
        assert "CACHEMESH_GRACE_S" in error.message
        assert "may have been billed" in error.message and "Idempotency-Key" in error.message
    assert fake.calls == 2


async def test_a_gateway_deadline_is_not_retried_by_the_sdks_default_policy(front: Front) -> None:
    """Both SDKs retry any status >= 500 twice by default: a deadline cut (billed for what it
    produced) would be run, and billed, three times. ``x-should-retry: false`` stops them."""
    front.gateway.refuse = (grpc.StatusCode.DEADLINE_EXCEEDED, "cut at its deadline; billed", ())
    claude = anthropic.AsyncAnthropic(base_url=front.base, api_key=KEY)  # max_retries: 2
    front.clients.append(claude)
    with pytest.raises(anthropic.APIStatusError) as by_claude:
        await claude.messages.create(model="sim-large", max_tokens=50, messages=ASK)
    assert by_claude.value.status_code == 504
    assert by_claude.value.response.headers["x-should-retry"] == "false"
    assert front.gateway.calls == 1
    gpt = openai.AsyncOpenAI(base_url=f"{front.base}/v1", api_key=KEY)  # max_retries: 2
    front.clients.append(gpt)
    with pytest.raises(openai.APIStatusError) as by_gpt:
        await gpt.chat.completions.create(model="sim-large", messages=ASK, stream=True)
    assert by_gpt.value.status_code == 504
    assert front.gateway.calls == 2


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN]
)
async def test_a_refusal_after_a_billed_model_call_is_not_retried_by_the_sdks(
    front: Front, code: grpc.StatusCode
) -> None:
    """The router ends a call whose model call was billed without its answer (a replica cut
    mid-answer on every replica it was handed to) with gRPC's server pushback
    ``grpc-retry-pushback-ms: -1``: a retry would be a new model call, billed again. The
    front's 529 / 503 / 500 said nothing of it, so each SDK retried twice (a live stack: a
    non-streaming ``create()`` whose replica was killed mid-answer, 155,000 nanos billed, was
    sent twice more). It says ``x-should-retry: false`` and that the call was billed."""
    billed = (("grpc-retry-pushback-ms", "-1"),)
    front.gateway.refuse = (code, "no model replica could serve the request", billed)
    claude, gpt = _retrying_clients(front)
    with pytest.raises(anthropic.APIStatusError) as by_claude:
        await claude.messages.create(model="sim-large", max_tokens=50, messages=ASK)
    assert by_claude.value.response.headers["x-should-retry"] == "false"
    assert "billed" in by_claude.value.message
    assert front.gateway.calls == 1
    with pytest.raises(openai.APIStatusError) as by_gpt:
        await gpt.chat.completions.create(model="sim-large", messages=ASK)
    assert by_gpt.value.response.headers["x-should-retry"] == "false"
    assert front.gateway.calls == 2
    with pytest.raises(openai.APIStatusError):
        await gpt.chat.completions.create(model="sim-large", messages=ASK, stream=True)
    assert front.gateway.calls == 3


@pytest.mark.parametrize(
    ("said", "sent", "param"),
    [
        ("max_tokens: must be > 0, got 0", {"max_tokens": 0}, "max_tokens"),
        # the caller's own field, not the Gateway's name of it
        ("max_tokens: must be > 0, got 0", {"max_completion_tokens": 0}, "max_completion_tokens"),
        # the front's default: no field the caller sent
        ("max_tokens: must be > 0, got 0", {}, None),
        (
            "messages[0].role: the first message must be the user's (ROLE_USER)",
            {},
            "messages[0].role",
        ),
        ("the prompt has 300010 tokens, over sim-small's context window", {}, None),
    ],
)
async def test_a_gateway_refusal_of_a_field_names_it_as_openais_param(
    front: Front, said: str, sent: dict[str, Any], param: str | None
) -> None:
    """OpenAI's error ``param`` names the field at fault (the SDK's ``BadRequestError.param``);
    the Gateway's refusals name it first in their message, and the front sent ``param: null``
    (a live stack: max_tokens 0, "max_tokens: must be > 0, got 0", param null). It names a
    field the caller sent: the Gateway's max_tokens is the caller's max_completion_tokens."""
    front.gateway.refuse = (grpc.StatusCode.INVALID_ARGUMENT, said, ())
    with pytest.raises(openai.BadRequestError) as refused:
        await _gpt(front).chat.completions.create(model="sim-large", messages=ASK, **sent)
    assert refused.value.param == param


async def test_a_gateway_refusal_names_its_paths_as_the_messages_api_does(front: Front) -> None:
    """The Gateway writes paths as Chat Completions does; an Anthropic SDK user was shown
    them so ("messages[1].content[0].tool_use.name: ..."), a form the Messages API never uses:
    each way the refusal reaches the caller (an error response, before and after a stream's
    head went out, and a stream's error event after its start) names them dotted, the rest of
    the words as the Gateway said them."""
    said = "messages[1].content[0].tool_use.name: 'f' is not a declared tool; declare it"
    dotted = "messages.1.content.0.tool_use.name: 'f' is not a declared tool; declare it"
    front.gateway.refuse = (grpc.StatusCode.INVALID_ARGUMENT, said, ())
    claude = _claude(front)
    with pytest.raises(anthropic.BadRequestError) as whole:
        await claude.messages.create(model="sim-large", max_tokens=50, messages=ASK)
    with pytest.raises(anthropic.BadRequestError) as streamed:
        async with claude.messages.stream(model="sim-large", max_tokens=50, messages=ASK) as stream:
            await stream.get_final_message()
    for refused in (whole, streamed):
        assert isinstance(refused.value.body, dict)
        assert refused.value.body["error"]["message"] == dotted
    front.gateway.refuse = None
    front.gateway.cut = f"the replica went away; {said}"
    with pytest.raises(anthropic.APIStatusError) as cut:
        async with claude.messages.stream(model="sim-large", max_tokens=50, messages=ASK) as stream:
            await stream.get_final_message()
    assert isinstance(cut.value.body, dict)
    assert cut.value.body["error"]["message"] == f"the replica went away; {dotted}"


async def test_an_openai_streams_error_after_its_start_names_the_callers_fields(
    front: Front,
) -> None:
    """An error after an OpenAI stream's start named the Gateway's request ("messages[0]":
    the caller's [1], after its system message), where the same refusal before the start, and
    the Anthropic side's error event after it, name the caller's; and a ``[DONE]`` followed
    it, which says the answer is whole (OpenAI's stream ends at its error chunk, as this
    front's own error before the start ends one)."""
    said = "messages[0].content[0].text: too long"
    front.gateway.cut = f"the replica went away; {said}"
    messages = [{"role": "system", "content": "s"}, *ASK]
    stream = await _gpt(front).chat.completions.create(
        model="sim-large", messages=messages, stream=True
    )
    with pytest.raises(openai.APIError) as cut:
        _ = [c async for c in stream]
    theirs = "messages[1].content: too long"
    assert cut.value.message == f"the replica went away; {theirs}"
    body = json.dumps({"model": "sim-large", "stream": True, "messages": messages}).encode()
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{front.base}/v1/chat/completions", data=body, headers=GPT_HEADERS) as reply,
    ):
        rest = (await reply.read()).decode()
    events = [line for line in rest.splitlines() if line.startswith("data:")]
    assert json.loads(events[-1].removeprefix("data: "))["error"]["message"] == (
        f"the replica went away; {theirs}"
    )
    assert "data: [DONE]" not in events


async def test_a_refusal_of_a_request_with_an_idempotency_key_carries_that_id(
    front: Front,
) -> None:
    """A request sent with an ``Idempotency-Key`` has that id at the Gateway (its access line,
    its answer's ``request-id``), and the Gateway's refusal says "retry with the same
    request_id"; its error response named a fresh id of the front's instead (x-request-id,
    request-id, Anthropic's body), which no retry, log line or ledger knew."""
    billed = (("grpc-retry-pushback-ms", "-1"),)
    front.gateway.refuse = (grpc.StatusCode.UNAVAILABLE, "failed mid-answer", billed)
    with pytest.raises(anthropic.APIStatusError) as by_claude:
        await _claude(front).messages.create(
            model="sim-large",
            max_tokens=50,
            messages=ASK,
            extra_headers={"Idempotency-Key": "order-7"},
        )
    assert by_claude.value.request_id == "order-7"
    assert isinstance(by_claude.value.body, dict)
    assert by_claude.value.body["request_id"] == "order-7"
    with pytest.raises(openai.APIStatusError) as by_gpt:
        await _gpt(front).chat.completions.create(
            model="sim-large", messages=ASK, extra_headers={"Idempotency-Key": "order-8"}
        )
    assert by_gpt.value.request_id == "order-8"
    assert by_gpt.value.response.headers["x-cachemesh-request-id"] == "order-8"


async def test_a_refusal_of_a_request_without_an_idempotency_key_names_the_gateways_id(
    front: Front,
) -> None:
    """A Gateway refusal of a request sent without an Idempotency-Key named a fresh id of the
    front's (a review, live stack: a 429's request-id was in no log, the router's access line
    of it named another): it names the id the Gateway made up, from its refusal's trailer."""
    made = (REQUEST_ID_KEY, "a772c70eae2d4aeb936d0670dc5a4da4")
    front.gateway.refuse = (grpc.StatusCode.UNAVAILABLE, "no replica answered", (made,))
    with pytest.raises(anthropic.APIStatusError) as by_claude:
        await _claude(front).messages.create(model="sim-large", max_tokens=50, messages=ASK)
    assert by_claude.value.request_id == made[1]
    assert isinstance(by_claude.value.body, dict) and by_claude.value.body["request_id"] == made[1]
    with pytest.raises(openai.APIStatusError) as by_gpt:
        await _gpt(front).chat.completions.create(model="sim-large", messages=ASK)
    assert by_gpt.value.request_id == made[1]
    assert by_gpt.value.response.headers["x-cachemesh-request-id"] == made[1]
    with pytest.raises(openai.APIStatusError) as own:  # the caller's own id: the Gateway's too
        await _gpt(front).chat.completions.create(
            model="sim-large", messages=ASK, extra_headers={"Idempotency-Key": "order-12"}
        )
    assert own.value.request_id == "order-12"


async def test_the_fronts_own_refusal_carries_the_callers_idempotency_key(
    front: Front,
) -> None:
    """A refusal of the front's own, before the Gateway (a field refused while the body is
    parsed, an unknown key), named a fresh id instead of the caller's Idempotency-Key (a
    review, idem_echo.py: the key was read only after the body was parsed), so no retry or
    log line could be matched to it."""
    with pytest.raises(openai.BadRequestError) as by_gpt:
        await _gpt(front).chat.completions.create(
            model="sim-large",
            messages=ASK,
            n=2,
            extra_headers={"Idempotency-Key": "order-9"},
        )
    assert by_gpt.value.request_id == "order-9"
    assert by_gpt.value.response.headers["x-cachemesh-request-id"] == "order-9"
    with pytest.raises(anthropic.BadRequestError) as by_claude:
        await _claude(front).messages.create(
            model="sim-large",
            max_tokens=50,
            messages=ASK,
            stop_sequences=["x"],
            extra_headers={"Idempotency-Key": "order-10"},
        )
    assert by_claude.value.request_id == "order-10"
    assert isinstance(by_claude.value.body, dict)
    assert by_claude.value.body["request_id"] == "order-10"
    gpt = openai.AsyncOpenAI(base_url=f"{front.base}/v1", api_key="sk-unknown", max_retries=0)
    front.clients.append(gpt)
    with pytest.raises(openai.AuthenticationError) as unknown:
        await gpt.chat.completions.create(
            model="sim-large", messages=ASK, extra_headers={"Idempotency-Key": "order-11"}
        )
    assert unknown.value.request_id == "order-11"
    assert front.gateway.calls == 0


@pytest.mark.parametrize(
    ("code", "trailers"),
    [
        (grpc.StatusCode.UNAVAILABLE, ()),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, (("retry-after", "1"),)),
        (grpc.StatusCode.INTERNAL, ()),
    ],
)
async def test_transient_refusals_leave_the_sdks_free_to_retry(
    front: Front, code: grpc.StatusCode, trailers: tuple[tuple[str, str], ...]
) -> None:
    front.gateway.refuse = (code, "transient", trailers)
    with pytest.raises(anthropic.APIStatusError) as by_claude:
        await _claude(front).messages.create(model="sim-large", max_tokens=50, messages=ASK)
    assert "x-should-retry" not in by_claude.value.response.headers


def _retrying_clients(front: Front) -> tuple[anthropic.AsyncAnthropic, openai.AsyncOpenAI]:
    """Both SDKs with their default retry policy (``max_retries=2``)."""
    claude = anthropic.AsyncAnthropic(base_url=front.base, api_key=KEY)
    gpt = openai.AsyncOpenAI(base_url=f"{front.base}/v1", api_key=KEY)
    front.clients += [claude, gpt]
    return claude, gpt


@pytest.mark.parametrize(
    "arguments",
    [
        '{"t": "smile \\ud83d"}',  # a lone UTF-16 surrogate escape: the front failed to encode it
        '{"t": NaN}',  # served as NaN, no JSON: the SDK's next turn was refused
        '{"t": 1e999}',
    ],
)
async def test_a_tool_input_json_has_not_reaches_both_sdks_as_json_and_once(
    front: Front, arguments: str
) -> None:
    """A tool call's input the Gateway answered with, which Python's json reads but JSON has
    not (an answer cached before the model adapter read it strictly): each SDK gets it kept
    visibly, as ``_unparsed_arguments``, in standard JSON it can send back; never a 500 the
    SDKs retry (each retry a model call and a bill)."""
    use = pb.ToolUse(id="toolu_1", name="say", input_json=arguments)
    front.gateway.answer = _answer(pb.ContentBlock(tool_use=use), stop="tool_use")
    kept = {"_unparsed_arguments": arguments}
    claude, gpt = _retrying_clients(front)
    message = await claude.messages.create(model="sim-large", max_tokens=50, messages=ASK)
    assert message.content[0].type == "tool_use" and message.content[0].input == kept
    assert front.gateway.calls == 1
    async with claude.messages.stream(model="sim-large", max_tokens=50, messages=ASK) as s:
        streamed = await s.get_final_message()
    assert streamed.content[0].input == kept  # type: ignore[union-attr]
    completion = await gpt.chat.completions.create(model="sim-large", messages=ASK)
    (call,) = completion.choices[0].message.tool_calls or []
    assert call.type == "function"
    assert json.loads(call.function.arguments, parse_constant=pytest.fail) == kept
    chunks = await gpt.chat.completions.create(model="sim-large", messages=ASK, stream=True)
    deltas = [c.choices[0].delta.tool_calls async for c in chunks if c.choices]
    sent = [d[0].function.arguments for d in deltas if d and d[0].function]
    assert [json.loads(a, parse_constant=pytest.fail) for a in sent if a] == [kept]
    assert front.gateway.calls == 4
    history: list[Any] = [
        *ASK,
        {"role": "assistant", "content": [message.content[0].model_dump()]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1"}]},
    ]
    await claude.messages.create(model="sim-large", max_tokens=50, messages=history)
    assert front.gateway.calls == 5  # the app's next turn is taken


async def test_a_front_failure_after_the_gateway_answered_is_not_retried(
    front: Front, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Gateway answered (and billed) the call; the front then failed (a bug in the
    translation). The 500 says ``x-should-retry: false``: each SDK retry would be a model
    call and a bill again."""

    def broken(*args: object) -> object:
        raise RuntimeError("a bug in the translation")

    monkeypatch.setattr(anthropic_api, "response", broken)
    monkeypatch.setattr(openai_api, "response", broken)
    monkeypatch.setattr(facts, "start_headers", broken)  # a stream's, once started
    claude, gpt = _retrying_clients(front)
    calls: list[Any] = [
        lambda: claude.messages.create(model="sim-large", max_tokens=50, messages=ASK),
        lambda: claude.messages.create(model="sim-large", max_tokens=50, messages=ASK, stream=True),
        lambda: gpt.chat.completions.create(model="sim-large", messages=ASK),
        lambda: gpt.chat.completions.create(model="sim-large", messages=ASK, stream=True),
    ]
    for n, call in enumerate(calls, start=1):
        with pytest.raises((anthropic.APIStatusError, openai.APIStatusError)) as failed:
            await call()
        error = failed.value
        assert isinstance(error, anthropic.APIStatusError | openai.APIStatusError)
        assert error.status_code == 500
        assert error.response.headers["x-should-retry"] == "false"
        assert "the HTTP front failed on this request" in error.message
        assert front.gateway.calls == n


async def _lines_until(reply: aiohttp.ClientResponse, wanted: bytes) -> list[bytes]:
    """The stream's lines up to and including the first that starts with ``wanted``."""
    lines: list[bytes] = []
    while True:
        line = await reply.content.readline()
        assert line, f"the stream ended before {wanted!r}: {lines}"
        lines.append(line.rstrip(b"\n"))
        if line.startswith(wanted):
            return lines


@pytest.mark.parametrize(
    ("path", "headers", "ping"),
    [
        ("/v1/messages", CLAUDE_HEADERS, b"event: ping"),
        ("/v1/chat/completions", GPT_HEADERS, b": ping"),
    ],
)
async def test_a_stream_whose_start_is_slow_sends_its_head_and_pings_before_it(
    pinging: Front, path: str, headers: dict[str, str], ping: bytes
) -> None:
    """A long prefill: the Gateway's start comes with the first token. Meanwhile the stream's
    head and a ping every HTTP_FRONT_PING_S go out (an SDK's read timeout, a proxy's idle
    timeout would cut the silence), and the answer follows them."""
    pinging.gateway.hold = asyncio.Event()  # the Gateway says nothing until released
    body = b'{"model": "sim-large", "max_tokens": 50, "stream": true, "messages": ' + HI
    async with aiohttp.ClientSession() as session:
        posted = session.post(f"{pinging.base}{path}", data=body, headers=headers)
        async with await asyncio.wait_for(posted, 10) as reply:  # the head, before the start
            assert reply.status == 200 and reply.content_type == "text/event-stream"
            # what is not known before the start is not said (was: served-by "unspecified")
            unknown = ("x-cachemesh-served-by", "x-cachemesh-model", "x-cachemesh-tier")
            assert [name for name in unknown if name in reply.headers] == []
            await asyncio.wait_for(_lines_until(reply, ping), 10)
            pinging.gateway.hold.set()
            rest = (await reply.read()).decode()
    events = [line for line in rest.splitlines() if line.startswith(("event:", "data:"))]
    if path == "/v1/messages":
        names = [e.removeprefix("event: ") for e in events if e.startswith("event:")]
        assert next(n for n in names if n != "ping") == "message_start"
        assert names[-1] == "message_stop"
    else:
        assert events[0].startswith('data: {"id":"chatcmpl-req1"') and '"role"' in events[0]
        assert events[-1] == "data: [DONE]"


async def test_the_sdks_read_a_stream_opened_before_its_start(pinging: Front) -> None:
    pinging.gateway.hold = asyncio.Event()
    claude = _claude(pinging)
    # create(stream=True) returns once the head is read: while the Gateway still holds the call
    events = await asyncio.wait_for(
        claude.messages.create(model="sim-large", max_tokens=50, messages=ASK, stream=True), 10
    )
    pinging.gateway.hold.set()
    kinds = [event.type async for event in events]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    pinging.gateway.hold.clear()
    chunks = await asyncio.wait_for(
        _gpt(pinging).chat.completions.create(model="sim-large", messages=ASK, stream=True), 10
    )
    pinging.gateway.hold.set()
    got = [c async for c in chunks]
    assert got[0].choices[0].delta.role == "assistant"
    assert got[-1].choices[0].finish_reason == "tool_calls"


async def test_a_refusal_after_the_early_head_is_the_streams_error_event(pinging: Front) -> None:
    """Once the head went out, a refusal (here the Gateway's deadline) is the provider's error
    event, counted with its own status."""
    pinging.gateway.hold = asyncio.Event()
    pinging.gateway.refuse = (grpc.StatusCode.DEADLINE_EXCEEDED, "cut at its deadline", ())
    events = await asyncio.wait_for(
        _claude(pinging).messages.create(
            model="sim-large", max_tokens=50, messages=ASK, stream=True
        ),
        10,
    )
    pinging.gateway.hold.set()
    with pytest.raises(anthropic.APIStatusError) as by_claude:
        _ = [event async for event in events]
    assert "cut at its deadline" in str(by_claude.value)
    pinging.gateway.hold.clear()
    chunks = await asyncio.wait_for(
        _gpt(pinging).chat.completions.create(model="sim-large", messages=ASK, stream=True), 10
    )
    pinging.gateway.hold.set()
    with pytest.raises(openai.APIError) as by_gpt:
        _ = [c async for c in chunks]
    assert "cut at its deadline" in str(by_gpt.value)
    async with aiohttp.ClientSession() as session, session.get(pinging.metrics) as reply:
        metrics = await reply.text()
    assert 'route="/v1/messages",status="504"} 1.0' in metrics
    assert 'route="/v1/chat/completions",status="504"} 1.0' in metrics


async def test_a_billed_refusal_after_the_early_head_is_not_retried_by_the_sdks(
    pinging: Front,
) -> None:
    """A stream whose head went out before the Gateway's start (a slow start, or a loaded
    front) ends a billed refusal with the stream's error event, not a status: neither SDK
    retries it, with their default retry policy (the premise of the ``front`` fixture's long
    HTTP_FRONT_PING_S: the early head is not a way around ``x-should-retry: false``)."""
    billed = (("grpc-retry-pushback-ms", "-1"),)
    pinging.gateway.refuse = (grpc.StatusCode.UNKNOWN, "no model replica could serve it", billed)
    pinging.gateway.hold = asyncio.Event()
    claude, gpt = _retrying_clients(pinging)
    events = await asyncio.wait_for(
        claude.messages.create(model="sim-large", max_tokens=50, messages=ASK, stream=True), 10
    )
    pinging.gateway.hold.set()
    with pytest.raises(anthropic.APIStatusError) as by_claude:
        _ = [event async for event in events]
    assert "billed" in str(by_claude.value)
    assert pinging.gateway.calls == 1
    pinging.gateway.hold.clear()
    chunks = await asyncio.wait_for(
        gpt.chat.completions.create(model="sim-large", messages=ASK, stream=True), 10
    )
    pinging.gateway.hold.set()
    with pytest.raises(openai.APIError) as by_gpt:
        _ = [c async for c in chunks]
    assert "billed" in str(by_gpt.value)
    assert pinging.gateway.calls == 2


async def test_a_refusal_after_the_early_head_names_the_gateways_id(pinging: Front) -> None:
    """A refusal after the head went out (pings) of a request without an Idempotency-Key
    named "" as its request_id in the error event (the head had no id to say): it names the
    id the Gateway made up, from its refusal's trailer, as a refusal before the head does."""
    made = (REQUEST_ID_KEY, "a772c70eae2d4aeb936d0670dc5a4da4")
    pinging.gateway.refuse = (grpc.StatusCode.UNAVAILABLE, "no replica answered", (made,))
    pinging.gateway.hold = asyncio.Event()
    asyncio.get_running_loop().call_later(0.3, pinging.gateway.hold.set)  # after pings
    body = b'{"model": "sim-large", "max_tokens": 50, "stream": true, "messages": ' + HI
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{pinging.base}/v1/messages", data=body, headers=CLAUDE_HEADERS) as reply,
    ):
        assert reply.status == 200  # the head went out before the refusal
        text = (await reply.read()).decode()
    assert "event: ping" in text
    errors = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
    errors = [e for e in errors if e.get("type") == "error"]
    assert [e["request_id"] for e in errors] == [made[1]], text


async def test_the_in_flight_limit_counts_a_tenants_keys_together(tmp_path: Path) -> None:
    """HTTP_FRONT_MAX_IN_FLIGHT_PER_KEY counts per tenant: a second key of the same tenant
    does not get a limit of its own, and the 429 says so."""
    other = "cm_test-second-key-of-tenant-a"
    keys = tmp_path / "two-keys"
    keys.write_text(f"tenant-a:{hash_key(KEY)}\ntenant-a:{hash_key(other)}\n")
    hold = asyncio.Event()
    gateway = FakeGateway(hold=hold)
    async with serving(tmp_path, gateway, CACHEMESH_API_KEYS_FILE=str(keys)) as served:
        first_client = anthropic.AsyncAnthropic(base_url=served.base, api_key=KEY, max_retries=0)
        second_client = anthropic.AsyncAnthropic(base_url=served.base, api_key=other, max_retries=0)
        first = asyncio.ensure_future(
            first_client.messages.create(model="sim-large", max_tokens=50, messages=ASK)
        )
        await asyncio.wait_for(gateway.arrived.wait(), 5)
        with pytest.raises(anthropic.RateLimitError) as limited:
            await second_client.messages.create(model="sim-large", max_tokens=50, messages=ASK)
        hold.set()
        await first
        await first_client.close()
        await second_client.close()
    assert "this tenant" in limited.value.message and "all of its API keys" in limited.value.message


async def test_an_unreachable_gateway_is_said_without_its_address(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With the router down, the 529/503 bodies carried gRPC's channel error verbatim
    ("failed to connect to all addresses; ... ipv4:127.0.0.1:50051: ... Connection refused"):
    an internal address. The caller gets a fixed message; the detail goes to the log."""
    nowhere = f"127.0.0.1:{free_port()}"
    async with serving(tmp_path, FakeGateway(), HTTP_FRONT_GATEWAY_ADDR=nowhere) as served:
        front = Front(served.base, served.stop, served.metrics)
        for path, headers, status in (
            ("/v1/messages", {"x-api-key": KEY, "anthropic-version": "2023-06-01"}, 529),
            ("/v1/chat/completions", {"authorization": f"Bearer {KEY}"}, 503),
        ):
            body = b'{"model": "sim-small", "max_tokens": 8, "messages": ' + HI
            got, reply = await _raw(front, path, body, headers)
            assert got == status
            message = reply["error"]["message"]
            assert message == "the Gateway is unreachable; retry"
    assert nowhere in caplog.text  # the detail, for the operator


class Endless(FakeGateway):
    """A stream that sends its start and first block, then nothing more."""

    async def StreamComplete(
        self, request: pb.CompleteRequest, context: Context
    ) -> AsyncIterator[pb.CompleteChunk]:
        yield pb.CompleteChunk(start=pb.CompleteResponse(request_id="req1", model="sim-large"))
        yield pb.CompleteChunk(delta=pb.ContentBlock(text="The tides"))
        await asyncio.Event().wait()


async def test_a_stream_cut_by_the_gateway_stopping_is_not_said_unreachable(tmp_path: Path) -> None:
    """A router stopping cuts the streams still running at the end of its grace: the caller
    is told the answer broke off, not that the Gateway (which answered) is unreachable."""
    async with serving(tmp_path, Endless()) as served:
        front = Front(served.base, served.stop, served.metrics)
        body = b'{"model": "sim-large", "max_tokens": 50, "stream": true, "messages": ' + HI
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{front.base}/v1/messages", data=body, headers=CLAUDE_HEADERS) as reply,
        ):
            await _lines_until(reply, b"event: content_block_delta")  # the Gateway answered
            assert served.gateway_server is not None
            await served.gateway_server.stop(0)  # the Gateway's server goes, the stream cut
            text = (await reply.read()).decode()
    error = json.loads(text.split("event: error\ndata: ", 1)[1].split("\n", 1)[0])["error"]
    assert error["type"] == "overloaded_error"  # retryable
    assert "unreachable" not in error["message"]
    assert error["message"] == gateway.BROKE_OFF


@dataclass
class Flood(FakeGateway):
    """A stream that never ends: 16 kB deltas for as long as the front takes them (a long
    answer, far larger than the buffers between the Gateway and a caller)."""

    sent: int = 0  # deltas the front took

    async def StreamComplete(
        self, request: pb.CompleteRequest, context: Context
    ) -> AsyncIterator[pb.CompleteChunk]:
        self.arrived.set()
        try:
            yield pb.CompleteChunk(start=pb.CompleteResponse(request_id="req1", model="sim-large"))
            piece = pb.ContentBlock(text="river " * 2731)
            while True:
                yield pb.CompleteChunk(delta=piece)
                self.sent += 1
        finally:
            self.cancelled.set()  # it only ends when the front cancels it


async def small_window(base: str) -> tuple[socket.socket, str]:
    """A raw non-blocking socket connected to ``base`` with a small receive window (4 KiB: it
    fills soon, so a caller that reads nothing more stalls the front's writes), and its host."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    return sock, host


async def read_to_end(sock: socket.socket) -> None:
    """What the buffers held for ``sock``, then its connection's end or reset (within 30 s)."""
    loop = asyncio.get_running_loop()
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(30):
            while await loop.sock_recv(sock, 1 << 16):
                pass


async def stalled_post(base: str, path: str, headers: dict[str, str], body: bytes) -> socket.socket:
    """``body`` POSTed on a raw socket with a small receive window (``small_window``); nothing
    read yet."""
    sock, host = await small_window(base)
    loop = asyncio.get_running_loop()
    fields = {**headers, "content-type": "application/json", "content-length": len(body)}
    head = f"POST {path} HTTP/1.1\r\nhost: {host}\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in fields.items()
    )
    await loop.sock_sendall(sock, head.encode() + b"\r\n" + body)
    return sock


@pytest.mark.parametrize(
    ("path", "headers"), [("/v1/messages", CLAUDE_HEADERS), ("/v1/chat/completions", GPT_HEADERS)]
)
async def test_a_caller_that_stops_reading_a_stream_loses_it_after_the_write_timeout(
    tmp_path: Path, path: str, headers: dict[str, str]
) -> None:
    """A caller that reads a stream's head and then nothing, its connection left open: once a
    write has waited HTTP_FRONT_WRITE_TIMEOUT_S, the front cancels the Gateway call (the router
    bills what was produced), closes the connection and frees the tenant's in-flight slot. It
    held them until the Gateway's deadline (600 s), or for ever once the Gateway had sent all."""
    flood = Flood()
    async with serving(tmp_path, flood, HTTP_FRONT_WRITE_TIMEOUT_S="0.2") as served:
        front = Front(served.base, served.stop, served.metrics)
        body = b'{"model": "sim-large", "max_tokens": 50, "stream": true, "messages": ' + HI
        sock = await stalled_post(front.base, path, headers, body)
        loop = asyncio.get_running_loop()
        assert (await loop.sock_recv(sock, 64)).startswith(b"HTTP/1.1 200")  # then reads no more
        try:
            await asyncio.wait_for(flood.cancelled.wait(), 60)  # for ever before the fix
            assert flood.sent > 0
            # the tenant's one in-flight slot (HTTP_FRONT_MAX_IN_FLIGHT_PER_KEY=1) is free again
            ok = b'{"model": "sim-large", "max_tokens": 50, "messages": ' + HI
            status, answer = await _raw(front, path, ok, headers)
            assert status == 200, answer
            async with aiohttp.ClientSession() as session, session.get(front.metrics) as reply:
                metrics = await reply.text()
            assert f'route="{path}",status="499"}} 1.0' in metrics
            # the connection is closed: what the buffers held, then its end (or its reset)
            await read_to_end(sock)
        finally:
            sock.close()


@pytest.mark.parametrize(
    ("path", "headers"), [("/v1/messages", CLAUDE_HEADERS), ("/v1/chat/completions", GPT_HEADERS)]
)
async def test_a_caller_that_never_reads_a_large_answer_loses_it_after_the_write_timeout(
    tmp_path: Path, path: str, headers: dict[str, str]
) -> None:
    """A non-streamed answer larger than the buffers between the front and a caller that
    never reads it: the front wrote it with no timeout, so the write waited for ever, holding
    its task, the answer's bytes and the connection (a stream's writes had
    HTTP_FRONT_WRITE_TIMEOUT_S). Each of its writes now has it too: once one has waited that
    long, the connection is closed and the request counted as 499."""
    # 3 MB of control characters: 18 MB of JSON (each one ``\u0001``), far more than the
    # socket buffers hold
    big = _answer(pb.ContentBlock(text="\x01" * 3_000_000))
    async with serving(
        tmp_path, FakeGateway(answer=big), HTTP_FRONT_WRITE_TIMEOUT_S="0.2"
    ) as served:
        front = Front(served.base, served.stop, served.metrics)
        body = b'{"model": "sim-large", "max_tokens": 50, "messages": ' + HI
        sock = await stalled_post(front.base, path, headers, body)
        loop = asyncio.get_running_loop()
        try:
            counted = f'route="{path}",status="499"}} 1.0'
            async with asyncio.timeout(30):  # for ever before the fix (it counted a 200)
                while True:
                    async with (
                        aiohttp.ClientSession() as session,
                        session.get(front.metrics) as reply,
                    ):
                        metrics = await reply.text()
                    if counted in metrics:
                        break
                    await asyncio.sleep(0.05)
            assert f'route="{path}",status="200"}}' not in metrics
            # the connection is closed: what the buffers held, then its end (or its reset),
            # not the whole answer (the front went on writing it before the fix)
            received = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := await loop.sock_recv(sock, 1 << 16):
                    received += chunk
            answer_head, _, answer_body = received.partition(b"\r\n\r\n")
            assert answer_head.startswith(b"HTTP/1.1 200")
            length = int(answer_head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            assert length > 18_000_000 and len(answer_body) < length
        finally:
            sock.close()


@pytest.mark.parametrize(("method", "path"), [("GET", "/nope"), ("PUT", "/v1/messages"),
                                             ("GET", "/healthz"), ("GET", "/readyz")])  # fmt: skip
async def test_a_caller_that_pipelines_and_never_reads_loses_its_connection(
    tmp_path: Path, small_send_buffers: None, method: str, path: str
) -> None:
    """Requests the routes answer themselves (a 404, a 405, ``/healthz``, ``/readyz``),
    pipelined on one connection whose caller never reads: aiohttp wrote those answers with no
    timeout, so once the socket was full the last write waited for ever, holding the
    connection and its task (with HTTP_FRONT_MAX_CONNECTIONS=1 every other caller was answered
    503: still after 10 s of a 0.2 s write timeout). They go out as the model routes' answers
    do now: the write timeout closes that connection, and the next caller is served."""
    async with serving(
        tmp_path, FakeGateway(), HTTP_FRONT_WRITE_TIMEOUT_S="0.2", HTTP_FRONT_MAX_CONNECTIONS="1"
    ) as served:
        sock, host = await small_window(served.base)
        loop = asyncio.get_running_loop()
        many = f"{method} {path} HTTP/1.1\r\nhost: {host}\r\n\r\n".encode() * 100
        try:
            # until the front stops reading them (its answers unread) or closes the connection
            with contextlib.suppress(TimeoutError, ConnectionError):
                async with asyncio.timeout(5):
                    for _ in range(2_000):
                        await loop.sock_sendall(sock, many)
            async with asyncio.timeout(30), aiohttp.ClientSession() as session:
                while True:  # 503 for ever before the fix: the one connection held
                    async with session.get(f"{served.base}/healthz") as reply:
                        if reply.status == 200:
                            break
                    await asyncio.sleep(0.05)
            # the stalled connection is closed: what the buffers held, then its end or reset
            await read_to_end(sock)
        finally:
            sock.close()


@pytest.mark.parametrize("value", ["0", "-1", "soon"])
def test_a_write_timeout_that_is_no_positive_number_stops_the_start(
    tmp_path: Path, value: str
) -> None:
    env = {
        "MODEL_REPLICAS": "sim-small=127.0.0.1:1,sim-large=127.0.0.1:1",
        "CACHEMESH_API_KEYS_FILE": str(tmp_path / "keys"),
        "HTTP_FRONT_WRITE_TIMEOUT_S": value,
    }
    with pytest.raises(ConfigError, match="HTTP_FRONT_WRITE_TIMEOUT_S"):
        HttpFrontSettings.from_env(env)
    assert (
        HttpFrontSettings.from_env({**env, "HTTP_FRONT_WRITE_TIMEOUT_S": "2.5"}).write_timeout_s
        == 2.5
    )


def test_the_models_that_think_by_default_are_their_rows(tmp_path: Path) -> None:
    """Claude Opus 5 and gpt-5 think unless told not to; Claude Sonnet 4.5 and gpt-5.4 do
    not; ``auto`` is marked when a model it may pick is."""
    deployed = "claude-opus-5,gpt-5,gpt-5-4,claude-sonnet-4-5,sim-small,sim-large"
    env = {
        "MODEL_REPLICAS": ",".join(f"{m}=127.0.0.1:1" for m in deployed.split(",")),
        "CACHEMESH_API_KEYS_FILE": str(tmp_path / "keys"),
    }
    settings = HttpFrontSettings.from_env(env)
    assert settings.thinks_by_default == {"claude-opus-5", "gpt-5"}
    picks_gpt5 = HttpFrontSettings.from_env({**env, "CACHEMESH_AUTO_LARGE": "gpt-5"})
    assert picks_gpt5.thinks_by_default == {"claude-opus-5", "gpt-5", "auto"}


@pytest.mark.parametrize("stream", [False, True])
async def test_a_prompt_over_the_context_window_has_openais_code(
    front: Front, stream: bool
) -> None:
    """The Gateway's refusal of a prompt over the model's context window (its ErrorInfo
    ``CONTEXT_WINDOW``: the router's own count, or the provider's 400) is answered as OpenAI
    answers it, code ``context_length_exceeded`` and param ``messages`` (the SDK's
    ``BadRequestError.code`` / ``.param``): what an application checks to trim a conversation
    or fall back to a model with a longer window, where any other 400 is its own mistake.
    Before, code and param were null."""
    message = "the prompt has 300010 tokens, over sim-small's context window"
    trailers = refusal_trailers(Code.RESOURCE_EXHAUSTED, message, CONTEXT_WINDOW)
    front.gateway.refuse = (grpc.StatusCode.RESOURCE_EXHAUSTED, message, trailers)
    with pytest.raises(openai.BadRequestError) as refused:
        await _gpt(front).chat.completions.create(model="sim-small", messages=ASK, stream=stream)
    assert refused.value.code == "context_length_exceeded"
    assert refused.value.param == "messages"
    assert refused.value.type == "invalid_request_error"
    assert refused.value.response.headers["x-should-retry"] == "false"
    with pytest.raises(anthropic.BadRequestError) as by_claude:  # its shape has no code
        await _claude(front).messages.create(model="sim-small", max_tokens=50, messages=ASK)
    assert by_claude.value.body == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": message},
        "request_id": by_claude.value.request_id,
    }


# the SDK's Chat Completions arguments the Gateway has no place for, with a value of each
_NOT_CARRIED: dict[str, Any] = {
    "audio": {"voice": "alloy", "format": "mp3"},
    "function_call": "auto",
    "functions": [{"name": "calc", "parameters": {"type": "object"}}],
    "modalities": ["text", "audio"],
    "moderation": {"model": "omni-moderation-latest"},
    "prediction": {"type": "content", "content": "x"},
    "prompt_cache_options": {"ttl": "30m"},
    "prompt_cache_retention": "24h",
    "verbosity": "low",
    "web_search_options": {},
}


@pytest.mark.parametrize("name", sorted(_NOT_CARRIED))
async def test_an_openai_argument_the_gateway_has_no_place_for_is_refused_saying_so(
    front: Front, name: str
) -> None:
    """Each of the installed SDK's Chat Completions arguments that the Gateway cannot carry,
    passed as the SDK types it, is a 400 naming it as not supported by cachemesh, with why and
    what to send: before, each was "<name>: Extra inputs are not permitted", the words of a
    field the API does not have (10 of 10), where OpenAI takes it."""
    with pytest.raises(openai.BadRequestError) as refused:
        await _gpt(front).chat.completions.create(
            model="sim-large", messages=ASK, **{name: _NOT_CARRIED[name]}
        )
    body: Any = refused.value.body
    assert body["message"].startswith(f"{name}: not supported by cachemesh ("), body
    assert refused.value.param == name
    assert front.gateway.calls == 0


async def test_every_openai_argument_is_named_by_the_front(front: Front) -> None:
    """The front knows every argument of the installed SDK's ``chat.completions.create`` (it
    carries it, accepts it at a value that changes nothing, or refuses it saying why): one the
    SDK gains is a failing test here, not a caller told its field does not exist. And
    ``modalities: ["text"]``, the default, changes nothing and is served."""
    for name in CompletionCreateParamsBase.__annotations__:
        try:
            parse_request({"model": "sim-large", "messages": ASK, name: None}, 64)
        except ApiError as refused:  # a field it has not typed as None is not "extra"
            assert "Extra inputs are not permitted" not in refused.message, name
    await _gpt(front).chat.completions.create(model="sim-large", messages=ASK, modalities=["text"])
    assert front.gateway.calls == 1
