"""A provider replica's gate (``MODEL_MAX_CONCURRENT_CALLS``): at most that many calls at the
engine at once, the rest waiting in the tenant-fair queue, each call's place freed as soon as
the engine's answer ends (not when its caller has read it), a wait bounded by the call's
deadline; 0 = no gate. The adapter is a fake engine whose answers end when the test says."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

import pytest

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from cachemesh.v1.prompt_pb2 import PromptFacts
from services.common.env import ConfigError
from services.common.errors import Code, RequestError
from services.common.models import ModelSpec
from services.common.tokens import Tokenizer, load_cl100k
from services.model.providers.api import ProviderApi
from services.model.providers.progress import Progress
from services.model.settings import ModelSettings
from tests.providers.replica import provider_replica, provider_settings

MODEL = "local-small"


@dataclass
class HeldEngine:
    """Each call's answer waits for its question's event; records the order calls came in."""

    backend: str = "openai"
    order: list[str] = field(default_factory=list)
    release: dict[str, asyncio.Event] = field(default_factory=dict)

    async def stream(
        self, spec: ModelSpec, request: pb.CompleteRequest, progress: Progress, timeout_s: float
    ) -> AsyncGenerator[model_pb2.GenerateChunk, None]:
        name = request.messages[0].content[0].text
        self.order.append(name)
        await self.release.setdefault(name, asyncio.Event()).wait()
        yield progress.start(12)
        yield progress.text("ok")
        yield model_pb2.GenerateChunk(end=model_pb2.GenerateEnd(stop_reason="end_turn"))

    def finish(self, name: str) -> None:
        self.release.setdefault(name, asyncio.Event()).set()

    async def close(self) -> None:
        return None


class Telemetry:
    def __init__(self) -> None:
        self.levels: Counter[str] = Counter()
        self.waited: list[str] = []

    def waiting(self, tenant: str, change: int) -> None:
        self.levels[tenant] += change

    def __call__(self, model: str, seconds: float) -> None:
        self.waited.append(model)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_cl100k()


def _api(
    engine: HeldEngine, tokenizer: Tokenizer, gate: int, telemetry: Telemetry | None = None
) -> ProviderApi:
    return provider_replica(
        provider_settings("openai", "http://127.0.0.1:1/v1"),  # an engine that takes no key
        [MODEL],
        adapter=engine,
        replica_id="llama-1",
        tokenizer=tokenizer,
        max_concurrent_calls=gate,
        watcher=telemetry,
        waits=telemetry,
    )


def _generate(tenant: str, name: str, tokens: int = 1500) -> model_pb2.GenerateRequest:
    question = pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=name)])
    request = pb.CompleteRequest(model=MODEL, max_tokens=16, messages=[question])
    facts = PromptFacts(prompt_tokens=tokens)
    return model_pb2.GenerateRequest(tenant=tenant, model=MODEL, request=request, prompt=facts)


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def _drain(api: ProviderApi, request: model_pb2.GenerateRequest) -> list[str]:
    return [c.WhichOneof("part") or "" async for c in api.generate(request, 60.0)]


async def test_a_light_tenant_goes_next_not_after_the_flood(tokenizer: Tokenizer) -> None:
    engine, telemetry = HeldEngine(), Telemetry()
    api = _api(engine, tokenizer, 1, telemetry)
    calls = [asyncio.ensure_future(_drain(api, _generate("b", f"b{i}"))) for i in range(5)]
    await _settle()
    calls.append(asyncio.ensure_future(_drain(api, _generate("a", "a0", 40))))
    await _settle()
    assert engine.order == ["b0"]  # one call at the engine; the others wait at the replica
    assert telemetry.levels == {"b": 4, "a": 1}
    for name in ("b0", "a0", "b1", "b2", "b3", "b4"):
        assert engine.order[-1] == name
        engine.finish(name)
        await _settle()
    assert all(call.done() and call.result() == ["start", "text", "end"] for call in calls)
    assert telemetry.levels == {"b": 0, "a": 0} and telemetry.waited == [MODEL] * 6


async def test_a_place_is_freed_at_the_answers_end_not_when_it_is_read(
    tokenizer: Tokenizer,
) -> None:
    engine = HeldEngine()
    api = _api(engine, tokenizer, 1)
    engine.finish("b0")
    slow = api.generate(_generate("b", "b0"), 60.0)
    parts = [(await anext(slow)).WhichOneof("part") for _ in range(3)]
    assert parts == ["start", "text", "end"]  # the end read, the stream not yet closed
    other = asyncio.ensure_future(_drain(api, _generate("a", "a0")))
    await _settle()
    assert engine.order == ["b0", "a0"]
    engine.finish("a0")
    assert await other == ["start", "text", "end"]
    await slow.aclose()


async def test_a_wait_past_the_deadline_is_deadline_exceeded_and_leaves(
    tokenizer: Tokenizer,
) -> None:
    engine, telemetry = HeldEngine(), Telemetry()
    api = _api(engine, tokenizer, 1, telemetry)
    held = asyncio.ensure_future(_drain(api, _generate("b", "b0")))
    await _settle()
    with pytest.raises(RequestError) as caught:
        await anext(api.generate(_generate("a", "a0"), 0.01))
    assert caught.value.code == Code.DEADLINE_EXCEEDED
    assert "MODEL_MAX_CONCURRENT_CALLS" in caught.value.message
    assert "1 calls ahead" in caught.value.message
    assert telemetry.levels == {"a": 0} and engine.order == ["b0"]  # (b0 never waited)
    engine.finish("b0")
    await held


async def test_no_gate_lets_every_call_through(tokenizer: Tokenizer) -> None:
    engine = HeldEngine()
    api = _api(engine, tokenizer, 0)
    calls = [asyncio.ensure_future(_drain(api, _generate("b", f"b{i}"))) for i in range(3)]
    await _settle()
    assert engine.order == ["b0", "b1", "b2"]
    for name in engine.order:
        engine.finish(name)
    await asyncio.gather(*calls)


@pytest.mark.parametrize(("gate", "fair"), [(1, True), (4, True), (0, False)])
async def test_the_start_says_whether_the_calls_wait_their_turn_by_tenant(
    tokenizer: Tokenizer, gate: int, fair: bool
) -> None:
    """The router predicts the queue ahead of a request per tenant only where the replica's
    fair queue serves it so: behind a gate, its start says so; without one (the engine's own
    order, first come first served), it says not."""
    engine = HeldEngine()
    api = _api(engine, tokenizer, gate)
    engine.finish("b0")
    starts = [
        c.start async for c in api.generate(_generate("b", "b0"), 60.0) if c.HasField("start")
    ]
    assert len(starts) == 1 and starts[0].HasField("tenant_fair_queue")
    assert starts[0].tenant_fair_queue is fair


def _settings(**extra: str) -> ModelSettings:
    env = {
        "CACHEMESH_INTERNAL_TOKEN": "internal-token-of-16+",
        "MODEL_BACKEND": "openai",
        "OPENAI_BASE_URL": "http://127.0.0.1:8080/v1",
        "MODEL_IDS": MODEL,
        **extra,
    }
    return ModelSettings.from_env(env)


def test_the_gate_defaults_to_a_self_hosted_engines_slots_else_none() -> None:
    assert _settings().max_concurrent_calls == 1  # local-small's replica_slots (--parallel 1)
    assert _settings(MODEL_IDS="llama-3-1-8b-vllm").max_concurrent_calls == 0  # it batches
    assert _settings(MODEL_MAX_CONCURRENT_CALLS="4").max_concurrent_calls == 4
    assert _settings(MODEL_MAX_CONCURRENT_CALLS="0").max_concurrent_calls == 0
    hosted = {"OPENAI_BASE_URL": "", "OPENAI_API_KEY": "sk-test", "MODEL_IDS": "gpt-4o"}
    assert _settings(**hosted).max_concurrent_calls == 0


@pytest.mark.parametrize("value", ["-1", "many", "10001"])
def test_a_bad_gate_is_refused_at_start_naming_the_variable(value: str) -> None:
    with pytest.raises(ConfigError, match="MODEL_MAX_CONCURRENT_CALLS"):
        _settings(MODEL_MAX_CONCURRENT_CALLS=value)
