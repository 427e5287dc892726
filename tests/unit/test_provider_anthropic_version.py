"""The Anthropic provider's API version. The SDK (anthropic 2.x) sends ``anthropic-version:
2026-10-21``, under which Anthropic refuses the sampling parameters (a 400, ``temperature:
Extra inputs are not permitted``, at their default values too); ``2023-06-01`` takes them. The
replica, built as ``serve()`` builds it, sends a request that carries a temperature as
2023-06-01 and one without as the SDK's own version, against the loopback Anthropic server,
which validates a request's version as the real API does (checked here first). Before, every
request with a temperature was sent as 2026-10-21 with the temperature in ``extra_body``: 5 of 5
refused (INVALID_ARGUMENT) by an API that answers them under 2023-06-01."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from anthropic._constants import ANTHROPIC_API_VERSION

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from services.model.providers.api import ProviderApi
from tests.providers.loopback import anthropic_replica, post_messages, serving
from tests.providers.wire_server import WireServer

CLAUDE = "claude-haiku-4-5"
ASK = {"model": CLAUDE, "max_tokens": 16, "messages": [{"role": "user", "content": "Capital?"}]}


@pytest.fixture(scope="module")
def server() -> Iterator[WireServer]:
    yield from serving()


def _post(server: WireServer, version: str | None, body: dict[str, Any]) -> tuple[int, Any]:
    """The loopback server's status and JSON error body (None: an answer) for a raw request."""
    return post_messages(server, body, version)


@pytest.mark.parametrize("field,value", [("temperature", 1.0), ("top_p", 0.9), ("top_k", 40)])
def test_the_loopback_server_refuses_sampling_under_2026_10_21_and_takes_it_before(
    server: WireServer, field: str, value: float
) -> None:
    """As Anthropic's versioning page says: removed from 2026-10-21, at a default value too."""
    status, body = _post(server, "2026-10-21", {**ASK, field: value})
    assert status == 400
    assert body["error"] == {
        "type": "invalid_request_error",
        "message": f"{field}: Extra inputs are not permitted",
    }
    for version in ("2023-06-01", "2023-01-01"):
        assert _post(server, version, {**ASK, field: value}) == (200, None)
    assert _post(server, "2026-10-21", ASK) == (200, None)


@pytest.mark.parametrize("model", ["claude-sonnet-5", "claude-opus-5"])
@pytest.mark.parametrize(
    "field,value", [("temperature", 0.5), ("temperature", 0.0), ("top_p", 0.9), ("top_k", 40)]
)
def test_the_loopback_server_refuses_a_claude_5_a_sampling_value_but_its_default(
    server: WireServer, model: str, field: str, value: float
) -> None:
    """Claude Sonnet 5 and Opus 5 refuse a sampling parameter set to a value but its default
    under every version (Anthropic's Sonnet 5 migration guide: a 400), in the API's words;
    its default (temperature 1) and none are answered under the versions that take sampling.
    Before, the loopback server answered them all, where a regression sending one would meet
    Anthropic's 400."""
    ask = {**ASK, "model": model}
    for version in ("2023-06-01", "2023-01-01"):
        status, body = _post(server, version, {**ask, field: value})
        assert status == 400, version
        assert body["error"] == {
            "type": "invalid_request_error",
            "message": f"`{field}` is deprecated for this model.",
        }
        assert _post(server, version, {**ask, "temperature": 1.0}) == (200, None)
        assert _post(server, version, ask) == (200, None)
    status, body = _post(server, "2026-10-21", {**ask, field: value})  # removed there, first
    assert (status, body["error"]["message"]) == (400, f"{field}: Extra inputs are not permitted")
    assert _post(server, "2026-10-21", {**ASK, field: value})[0] == 400  # an earlier Claude too
    assert _post(server, "2023-06-01", {**ASK, field: value}) == (200, None)  # it takes it


def test_the_loopback_server_refuses_a_missing_or_unknown_version(server: WireServer) -> None:
    status, body = _post(server, None, ASK)
    assert (status, body["error"]["message"]) == (400, "anthropic-version: header is required")
    status, body = _post(server, "2023-10-01", ASK)
    assert status == 400
    assert body["error"]["message"] == 'anthropic-version: "2023-10-01" is not a valid version'


@pytest.fixture
async def replica(server: WireServer) -> AsyncIterator[ProviderApi]:
    async for api in anthropic_replica(server, CLAUDE):
        yield api


async def _answer(api: ProviderApi, temperature: float | None) -> model_pb2.GenerateEnd:
    message = pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="Capital?")])
    request = pb.CompleteRequest(model=CLAUDE, max_tokens=16, messages=[message])
    if temperature is not None:
        request.temperature = temperature
    call = model_pb2.GenerateRequest(tenant="t", model=CLAUDE, request=request)
    chunks = [chunk async for chunk in api.generate(call, 10.0)]
    assert chunks[-1].HasField("end")
    return chunks[-1].end


async def test_a_temperature_is_sent_under_the_version_that_takes_it(
    server: WireServer, replica: ProviderApi
) -> None:
    assert ANTHROPIC_API_VERSION >= "2026-10-21"  # the SDK's own version refuses it
    for temperature in (0.0, 0.7, 1.0):  # 0 and the default 1.0 too
        end = await _answer(replica, temperature)
        assert end.stop_reason == "end_turn"
        sent = server.seen_by("anthropic")[-1]
        assert sent.status == 200
        assert sent.headers["anthropic-version"] == "2023-06-01"
        assert sent.body["temperature"] == temperature


async def test_a_request_without_a_temperature_keeps_the_sdks_version(
    server: WireServer, replica: ProviderApi
) -> None:
    await _answer(replica, None)
    sent = server.seen_by("anthropic")[-1]
    assert sent.headers["anthropic-version"] == ANTHROPIC_API_VERSION
    assert "temperature" not in sent.body
    assert sent.status == 200
