"""Who refused: a replica's errors and lines name the row's provider as the model table
configures it. A self-hosted engine (llama-server, vLLM: a ``self_hosted`` row served through
the OpenAI-compatible adapter) is not OpenAI: its refusal said "openai refused the request",
and a person running llama.cpp read that OpenAI had refused them. Hosted OpenAI's words stay.
The replica is built as ``serve()`` builds it and calls the loopback OpenAI wire server."""

from __future__ import annotations

import io
import re
import uuid
from collections.abc import Iterator

import pytest

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from services.common.env import Env
from services.common.errors import RequestError
from tests.providers import openai_wire
from tests.providers.loopback import serving
from tests.providers.replica import provider_replica, provider_settings, service_log
from tests.providers.wire_server import Reply, WireServer

SELF_HOSTED = "local-small"
HOSTED = "gpt-4-1"
BAD = openai_wire.error(400, "invalid_request_error", "messages: bad shape")
DOWN = openai_wire.error(500, "server_error", "the engine failed")
UNAUTHORIZED = openai_wire.error(401, "invalid_request_error", "Invalid API Key")


@pytest.fixture(scope="module")
def server() -> Iterator[WireServer]:
    yield from serving()


@pytest.fixture
def logged() -> Iterator[io.StringIO]:
    yield from service_log(Env({}))


async def _generated(server: WireServer, model: str, reply: Reply) -> list[model_pb2.GenerateChunk]:
    """A question to ``model``'s replica, the loopback OpenAI server answering ``reply``."""
    server.reset()
    server.script("openai", reply)
    settings = provider_settings("openai", server.base + "/v1", "sk-openai-loopback-0123456789")
    api = provider_replica(settings, [model])
    message = pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="Capital?")])
    request = pb.CompleteRequest(model=model, max_tokens=16, messages=[message])
    call = model_pb2.GenerateRequest(tenant="t", model=model, request=request)
    try:
        return [chunk async for chunk in api.generate(call, 10.0)]
    finally:
        await api.close()


async def _refused(server: WireServer, model: str, reply: Reply) -> RequestError:
    try:
        chunks = await _generated(server, model, reply)
    except RequestError as refused:
        return refused
    raise AssertionError(f"answered: {chunks[-1]}")


@pytest.mark.parametrize("reply", [BAD, openai_wire.TOO_LONG_LLAMA, DOWN, UNAUTHORIZED])
async def test_a_self_hosted_engines_refusal_names_the_engine_not_openai(
    server: WireServer, logged: io.StringIO, reply: Reply
) -> None:
    refused = await _refused(server, SELF_HOSTED, reply)
    said = [refused.message, refused.reason, logged.getvalue()]
    assert not any(re.search(r"\bopenai\b", text, re.IGNORECASE) for text in said), said
    assert "self-hosted engine" in refused.message, refused.message
    assert "self-hosted engine" in logged.getvalue()


async def test_a_credentials_line_still_names_the_variable_to_fix(
    server: WireServer, logged: io.StringIO
) -> None:
    """The key a self-hosted engine refused is still set as OPENAI_API_KEY (the adapter's)."""
    await _refused(server, SELF_HOSTED, UNAUTHORIZED)
    line = logged.getvalue()
    assert "self-hosted engine refused the credentials" in line
    assert "OPENAI_API_KEY" in line


@pytest.mark.parametrize("reply", [BAD, DOWN])
async def test_hosted_openais_refusal_keeps_its_words(
    server: WireServer, logged: io.StringIO, reply: Reply
) -> None:
    refused = await _refused(server, HOSTED, reply)
    assert refused.message.startswith("openai "), refused.message
    assert "self-hosted" not in refused.message + logged.getvalue()


async def test_an_engines_unknown_stop_reason_line_names_the_engine(
    server: WireServer, logged: io.StringIO
) -> None:
    """vLLM and SGLang end an aborted request with their own reasons; the line said "openai
    answered with the unknown stop reason"."""
    reason = f"eos-{uuid.uuid4().hex[:8]}"  # (each reason is logged once a process)
    events = openai_wire.stream(SELF_HOSTED, ["Par"], openai_wire.usage(9, 0, 1), finish=reason)
    chunks = await _generated(server, SELF_HOSTED, Reply(events=events))
    assert chunks[-1].end.stop_reason == "max_tokens"
    said = f"self-hosted engine answered with the unknown stop reason '{reason}'"
    assert said in logged.getvalue()
