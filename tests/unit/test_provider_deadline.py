"""A provider replica's retries live within the call's deadline (the request's, passed down by
the router): a retry-after that outlasts the time left is not waited for, and the refusal
names it. The adapter is a fake raising the official SDK's own 429; the clock and the sleep
are injected."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

import anthropic
import httpx2
import pytest

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from services.common.errors import Code, RequestError
from services.common.models import ModelSpec
from services.common.tokens import Tokenizer, load_cl100k
from services.model.providers.api import ProviderApi
from services.model.providers.progress import Progress
from tests.providers.replica import provider_replica, provider_settings

MODEL = "claude-sonnet-4-5"


def _rate_limited(retry_after: str) -> anthropic.RateLimitError:
    body = {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}
    request = httpx2.Request("POST", "http://127.0.0.1:1/v1/messages")
    response = httpx2.Response(
        429, headers={"retry-after": retry_after}, json=body, request=request
    )
    return anthropic.RateLimitError("slow down", response=response, body=body)


@dataclass
class Clock:
    now: float = 100.0
    slept: list[float] = field(default_factory=list)

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@dataclass
class RateLimitedAdapter:
    """Answers 429 with ``retry_after`` ``refusals`` times, then a one-word answer."""

    retry_after: str
    refusals: int
    backend: str = "anthropic"
    calls: list[float] = field(default_factory=list)  # each call's timeout_s

    async def stream(
        self,
        spec: ModelSpec,
        request: pb.CompleteRequest,
        progress: Progress,
        timeout_s: float,
    ) -> AsyncGenerator[model_pb2.GenerateChunk, None]:
        self.calls.append(timeout_s)
        if len(self.calls) <= self.refusals:
            raise _rate_limited(self.retry_after)
        yield progress.start(12)
        yield progress.text("Paris.")
        yield model_pb2.GenerateChunk(end=model_pb2.GenerateEnd(stop_reason="end_turn"))

    async def close(self) -> None:
        return None


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_cl100k()


def _api(adapter: RateLimitedAdapter, clock: Clock, tokenizer: Tokenizer) -> ProviderApi:
    settings = provider_settings(
        "anthropic",
        "http://127.0.0.1:1",
        "sk-ant-test",
        max_retries=2,
        backoff_s=0.5,
        backoff_max_s=8.0,
    )
    return provider_replica(
        settings,
        [MODEL],
        adapter=adapter,
        replica_id="anthropic-1",
        tokenizer=tokenizer,
        clock=clock,
        sleep=clock.sleep,
    )


def _generate() -> model_pb2.GenerateRequest:
    question = pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="Capital?")])
    request = pb.CompleteRequest(model=MODEL, max_tokens=16, messages=[question])
    return model_pb2.GenerateRequest(tenant="t", model=MODEL, request=request)


async def _drain(api: ProviderApi, time_remaining_s: float | None) -> list[str]:
    return [c.WhichOneof("part") or "" async for c in api.generate(_generate(), time_remaining_s)]


async def test_a_retry_after_beyond_the_deadline_is_not_waited_for(tokenizer: Tokenizer) -> None:
    clock = Clock()
    adapter = RateLimitedAdapter(retry_after="5", refusals=1)
    with pytest.raises(RequestError) as caught:
        await _drain(_api(adapter, clock, tokenizer), time_remaining_s=1.0)
    assert clock.slept == [] and len(adapter.calls) == 1  # no wait, no second try
    assert caught.value.code == Code.UNAVAILABLE
    named = "its retry-after (5.0 s) outlasts the request's deadline (1.0 s left)"
    assert named in caught.value.message and named in caught.value.reason
    assert "429 rate_limit_error" in caught.value.reason
    assert "anthropic-1" not in caught.value.reason  # the reason names no replica
    # the provider's wait goes on to the router (the replica's retry-after trailer), and from
    # it to the client: before, nothing said it and the SDKs retried at once
    assert caught.value.retry_after_s == 5


@pytest.mark.parametrize(("retry_after", "told"), [("0.2", 1), ("30", 30), ("29.5", 30)])
async def test_a_refused_retry_after_is_told_in_whole_seconds_rounded_up(
    tokenizer: Tokenizer, retry_after: str, told: int
) -> None:
    clock = Clock()
    adapter = RateLimitedAdapter(retry_after=retry_after, refusals=1)
    with pytest.raises(RequestError) as caught:
        await _drain(_api(adapter, clock, tokenizer), time_remaining_s=0.1)
    assert caught.value.code == Code.UNAVAILABLE and caught.value.retry_after_s == told


async def test_a_refusal_after_its_tries_without_a_retry_after_tells_its_next_backoff(
    tokenizer: Tokenizer,
) -> None:
    """Its retries spent, the replica says so (``retried``) with the wait its next try would
    have had (0.5 s, 1 s, then 2 s): before, it said none, and the callers above retried at
    once, each retry three provider calls more (``test_retry_storm``)."""
    clock = Clock()
    adapter = RateLimitedAdapter(retry_after="not a figure", refusals=5)
    with pytest.raises(RequestError) as caught:
        await _drain(_api(adapter, clock, tokenizer), time_remaining_s=10.0)
    assert "after 3 tries" in caught.value.message
    assert caught.value.retry_after_s == 2 and caught.value.retried


async def test_a_retry_after_within_the_deadline_is_honoured(tokenizer: Tokenizer) -> None:
    clock = Clock()
    adapter = RateLimitedAdapter(retry_after="1", refusals=1)
    parts = await _drain(_api(adapter, clock, tokenizer), time_remaining_s=10.0)
    assert parts == ["start", "text", "end"]
    assert clock.slept == [1.0]
    # the SDK call's own timeout is what is left of the deadline, try after try
    assert adapter.calls == [pytest.approx(10.0), pytest.approx(9.0)]


async def test_a_call_without_a_deadline_gets_the_default_budget(tokenizer: Tokenizer) -> None:
    clock = Clock()
    adapter = RateLimitedAdapter(retry_after="5", refusals=1)
    parts = await _drain(_api(adapter, clock, tokenizer), time_remaining_s=None)
    assert parts == ["start", "text", "end"] and clock.slept == [5.0]


@dataclass
class TwoPartAdapter:
    """Starts at once, then takes ``pause_s`` before its last part."""

    pause_s: float = 0.0
    backend: str = "anthropic"
    closed: bool = False

    async def stream(
        self, spec: ModelSpec, request: pb.CompleteRequest, progress: Progress, timeout_s: float
    ) -> AsyncGenerator[model_pb2.GenerateChunk, None]:
        try:
            yield progress.start(12)
            await asyncio.sleep(self.pause_s)
            yield progress.text("Paris.")
            yield model_pb2.GenerateChunk(end=model_pb2.GenerateEnd(stop_reason="end_turn"))
        finally:
            self.closed = True

    async def close(self) -> None:
        return None


def _real_time_api(adapter: TwoPartAdapter, tokenizer: Tokenizer) -> ProviderApi:
    api = _api(adapter, Clock(), tokenizer)  # type: ignore[arg-type]
    api._clock = time.monotonic  # the deadline on the loop's own time, as in the service
    return api


async def test_a_deadline_passing_while_the_consumer_writes_ends_the_answer_not_the_task(
    tokenizer: Tokenizer,
) -> None:
    """The deadline bounds the waits for the provider. One that passes while the caller is
    busy with a chunk (writing it to a slow client) must not cancel the caller's task: the
    answer ends, interrupted, at the caller's next read."""
    adapter = TwoPartAdapter()
    parts: list[model_pb2.GenerateChunk] = []
    async for chunk in _real_time_api(adapter, tokenizer).generate(_generate(), 0.05):
        parts.append(chunk)
        await asyncio.sleep(0.2)  # a slow client: past the deadline
    assert [c.WhichOneof("part") for c in parts] == ["start", "end"]
    assert parts[-1].end.interrupted and "deadline" in parts[-1].end.error
    assert adapter.closed


async def test_a_provider_slower_than_the_deadline_is_interrupted(tokenizer: Tokenizer) -> None:
    """Cut at the deadline, by what the answer holds (not by real time): its start, then an
    interrupted end naming the deadline, the adapter's last part never waited for."""
    adapter = TwoPartAdapter(pause_s=5.0)
    api = _real_time_api(adapter, tokenizer)
    parts = [c async for c in api.generate(_generate(), 0.1)]
    assert [c.WhichOneof("part") for c in parts] == ["start", "end"]
    assert parts[-1].end.interrupted and "deadline" in parts[-1].end.error
    assert adapter.closed
