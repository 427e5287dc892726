"""A provider's 401 (or an error typed as our credentials') takes the replica NOT_SERVING; a
403 that concerns one model (OpenAI: ``invalid_request_error`` / ``model_not_found``, "Project
... does not have access to model ...") is this replica's for that model (``UNAVAILABLE``: the
router's next replica, counted toward this one's ejection for that model; a caller names a row
of the table, never the provider's model), and every other model the key may use keeps being
served. The adapter is a fake raising the official SDK's own errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field

import httpx2
import openai
import pytest

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from services.common.errors import Code, RequestError
from services.common.models import ModelSpec, load_model_table
from services.common.tokens import Tokenizers, load_tokenizers
from services.model.providers.api import ProviderApi
from services.model.providers.progress import Progress
from tests.providers.replica import provider_replica, provider_settings
from tests.waits import reached

KEY = "sk-proj-test-0123456789abcdef"
FORBIDDEN_MODEL = "gpt-5"
ALLOWED_MODEL = "gpt-4-1-mini"


def _status_error(status: int, error: dict[str, str]) -> openai.APIStatusError:
    body = {"error": {"param": None, **error}}
    request = httpx2.Request("POST", "https://api.openai.com/v1/chat/completions")
    response = httpx2.Response(status, json=body, request=request)
    cls = openai.AuthenticationError if status == 401 else openai.PermissionDeniedError
    return cls(str(error["message"]), response=response, body=body)


NO_ACCESS = {
    "message": f"Project `proj_abc` does not have access to model `{FORBIDDEN_MODEL}`",
    "type": "invalid_request_error",
    "code": "model_not_found",
}
BAD_KEY = {
    "message": f"Incorrect API key provided: {KEY[:8]}****cdef.",
    "type": "invalid_request_error",
    "code": "invalid_api_key",
}


@dataclass
class RefusingAdapter:
    """Raises ``refusal`` for ``FORBIDDEN_MODEL`` (every model when ``all_models``)."""

    refusal: openai.APIStatusError
    all_models: bool = False
    backend: str = "openai"
    calls: list[str] = field(default_factory=list)

    async def stream(
        self,
        spec: ModelSpec,
        request: pb.CompleteRequest,
        progress: Progress,
        timeout_s: float,
    ) -> AsyncGenerator[model_pb2.GenerateChunk, None]:
        self.calls.append(spec.id)
        if self.all_models or spec.id == FORBIDDEN_MODEL:
            raise self.refusal
        yield progress.start(10)
        yield progress.text("Hello.")
        yield model_pb2.GenerateChunk(end=model_pb2.GenerateEnd(stop_reason="end_turn"))

    async def close(self) -> None:
        return None


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizers:
    table = load_model_table()  # the gpt rows' vocabulary, o200k_base
    return load_tokenizers(table.models[m] for m in (FORBIDDEN_MODEL, ALLOWED_MODEL))


def _api(
    adapter: RefusingAdapter,
    tokenizer: Tokenizers,
    health: list[bool],
    clock: Callable[[], float] = lambda: 100.0,
) -> ProviderApi:
    async def set_health(serving: bool) -> None:
        health.append(serving)

    settings = provider_settings("openai", "https://api.openai.com/v1", KEY, max_retries=2)
    return provider_replica(
        settings,
        [FORBIDDEN_MODEL, ALLOWED_MODEL],
        adapter=adapter,
        tokenizer=tokenizer,
        set_health=set_health,
        clock=clock,
    )


def _request(model: str) -> model_pb2.GenerateRequest:
    message = pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="Hi")])
    request = pb.CompleteRequest(model=model, max_tokens=50, messages=[message])
    return model_pb2.GenerateRequest(tenant="t", model=model, request=request)


async def _stop_reason(api: ProviderApi, model: str) -> str:
    chunks = [chunk async for chunk in api.generate(_request(model), 10.0)]
    return chunks[-1].end.stop_reason


async def test_a_403_for_one_model_is_the_replicas_and_keeps_it_serving_the_others(
    tokenizer: Tokenizers,
) -> None:
    health: list[bool] = []
    adapter = RefusingAdapter(_status_error(403, NO_ACCESS))
    api = _api(adapter, tokenizer, health)
    with pytest.raises(RequestError) as refused:
        await _stop_reason(api, FORBIDDEN_MODEL)
    assert refused.value.code == Code.UNAVAILABLE  # the next replica's, not the caller's 400
    # the provider's message (it may quote the request) is at DEBUG only: its identifiers here
    assert "does not have access to model" not in refused.value.message
    assert "403 invalid_request_error, code model_not_found" in refused.value.message
    assert "MODEL_UPSTREAM_IDS" in refused.value.message  # the operator's line says what to check
    assert "MODEL_UPSTREAM_IDS" not in (refused.value.reason or "")  # never the caller's
    assert "403" in refused.value.message
    assert await _stop_reason(api, ALLOWED_MODEL) == "end_turn"
    assert health == []  # never NOT_SERVING
    assert adapter.calls == [FORBIDDEN_MODEL, ALLOWED_MODEL]  # the 403 is not retried


async def test_a_refused_key_takes_the_replica_out_for_every_model(tokenizer: Tokenizers) -> None:
    health: list[bool] = []
    adapter = RefusingAdapter(_status_error(401, BAD_KEY), all_models=True)
    api = _api(adapter, tokenizer, health)
    with pytest.raises(RequestError) as refused:
        await _stop_reason(api, ALLOWED_MODEL)
    assert refused.value.code == Code.UNAVAILABLE and KEY[:8] not in refused.value.message
    with pytest.raises(RequestError, match="NOT_SERVING"):
        await _stop_reason(api, FORBIDDEN_MODEL)  # refused at once, without calling
    assert health == [False] and adapter.calls == [ALLOWED_MODEL]


async def test_a_403_typed_as_a_permission_error_is_our_credentials(tokenizer: Tokenizers) -> None:
    """Anthropic's ``permission_error`` (the key may not use the API) is the key's fault."""
    health: list[bool] = []
    refusal = _status_error(403, {"message": "not allowed", "type": "permission_error"})
    api = _api(RefusingAdapter(refusal, all_models=True), tokenizer, health)
    with pytest.raises(RequestError) as refused:
        await _stop_reason(api, ALLOWED_MODEL)
    assert refused.value.code == Code.UNAVAILABLE and health == [False]


@dataclass
class GatedAdapter(RefusingAdapter):
    """``RefusingAdapter`` whose calls wait for ``gate`` before the provider answers, refusing
    the key while ``refusing``."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # a call waits at the gate
    refusing: bool = True

    async def stream(
        self,
        spec: ModelSpec,
        request: pb.CompleteRequest,
        progress: Progress,
        timeout_s: float,
    ) -> AsyncGenerator[model_pb2.GenerateChunk, None]:
        self.calls.append(spec.id)
        self.arrived.set()
        await self.gate.wait()
        if self.refusing:
            raise self.refusal
        yield progress.start(10)
        yield progress.text("Hello.")
        yield model_pb2.GenerateChunk(end=model_pb2.GenerateEnd(stop_reason="end_turn"))


async def _calls_at_once(api: ProviderApi, adapter: GatedAdapter, n: int) -> list[BaseException]:
    """``n`` calls at once while the provider is slow to answer, then it answers: each call's
    failure (the refusals first)."""
    adapter.gate.clear()
    adapter.arrived.clear()
    tasks = [asyncio.create_task(_stop_reason(api, ALLOWED_MODEL)) for _ in range(n)]
    await reached(
        adapter.arrived, "adapter.arrived"
    )  # the first at the provider; the others ran meanwhile
    await asyncio.sleep(0)
    adapter.gate.set()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    return [result for result in done if isinstance(result, BaseException)]


async def test_one_call_at_a_time_rechecks_a_refused_key(tokenizer: Tokenizers) -> None:
    """After ``auth_recheck_s`` one call goes to the provider with the refused key; the calls
    arriving while it waits for the answer are refused at once, as before the recheck time.
    Before, every one of them went (20 of 20 concurrent calls reached the provider)."""
    now = [100.0]
    health: list[bool] = []
    adapter = GatedAdapter(_status_error(401, BAD_KEY), all_models=True)
    adapter.gate.set()
    api = _api(adapter, tokenizer, health, lambda: now[0])
    with pytest.raises(RequestError):
        await _stop_reason(api, ALLOWED_MODEL)  # the 401: NOT_SERVING
    assert len(adapter.calls) == 1 and health == [False]

    now[0] += 60.0  # time to try the key again: one call does, and is refused again
    failures = await _calls_at_once(api, adapter, 20)
    assert len(adapter.calls) == 2, f"{len(adapter.calls) - 1} calls rechecked the key"
    assert len(failures) == 20
    assert all(isinstance(f, RequestError) and f.code == Code.UNAVAILABLE for f in failures)
    with pytest.raises(RequestError, match="NOT_SERVING"):
        await _stop_reason(api, ALLOWED_MODEL)  # refused again: the next recheck in 60 s
    assert len(adapter.calls) == 2

    now[0] += 60.0  # a recheck that never answers (its caller left) lets the next one try
    adapter.gate.clear()
    adapter.arrived.clear()
    left = asyncio.create_task(_stop_reason(api, ALLOWED_MODEL))
    await reached(adapter.arrived, "adapter.arrived")
    left.cancel()
    with pytest.raises(asyncio.CancelledError):
        await left

    adapter.refusing = False  # the key was fixed: the next call rechecks it, and is served
    failures = await _calls_at_once(api, adapter, 5)
    assert len(adapter.calls) == 4 and len(failures) == 4 and health == [False, True]
    assert await _stop_reason(api, ALLOWED_MODEL) == "end_turn"


@dataclass
class AnsweringThenRefused(RefusingAdapter):
    """Its first call answers, slowly (until ``finish``); every later call is refused."""

    finish: asyncio.Event = field(default_factory=asyncio.Event)
    answering: asyncio.Event = field(default_factory=asyncio.Event)

    async def stream(
        self,
        spec: ModelSpec,
        request: pb.CompleteRequest,
        progress: Progress,
        timeout_s: float,
    ) -> AsyncGenerator[model_pb2.GenerateChunk, None]:
        self.calls.append(spec.id)
        if len(self.calls) > 1:
            raise self.refusal
        yield progress.start(10)
        self.answering.set()
        await self.finish.wait()
        yield progress.text("Hello.")
        yield model_pb2.GenerateChunk(end=model_pb2.GenerateEnd(stop_reason="end_turn"))


async def test_a_call_that_was_running_when_the_key_was_refused_does_not_bring_it_back(
    tokenizer: Tokenizers,
) -> None:
    """Only a recheck may: a call that started before the refusal and ended whole put the
    replica back in service at once, and the next call went to the provider with the refused
    key (health [False, True, False], a second ERROR line, 3 provider calls)."""
    health: list[bool] = []
    adapter = AnsweringThenRefused(_status_error(401, BAD_KEY), all_models=True)
    api = _api(adapter, tokenizer, health)
    running = asyncio.create_task(_stop_reason(api, ALLOWED_MODEL))
    await reached(adapter.answering, "adapter.answering")
    with pytest.raises(RequestError):
        await _stop_reason(api, ALLOWED_MODEL)  # refused: NOT_SERVING
    adapter.finish.set()
    assert await running == "end_turn"
    with pytest.raises(RequestError, match="NOT_SERVING"):
        await _stop_reason(api, ALLOWED_MODEL)  # still out: refused here, not sent
    assert len(adapter.calls) == 2 and health == [False]
