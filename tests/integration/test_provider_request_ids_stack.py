"""On real processes: the provider's id of a call (the loopback servers send Anthropic's
``request-id`` and OpenAI's ``x-request-id`` as the real APIs do) reaches the replica's
exported span and its log, for an answer and for a provider's refusal, and never the caller's
error; a tool name Claude's API refuses is refused by the router, with no provider call."""

from __future__ import annotations

import json
import time
import uuid

import grpc
import pytest

from cachemesh import CachemeshError, Client
from cachemesh.v1 import gateway_pb2 as pb
from services.model.providers.api import REQUEST_ID_ATTRIBUTE
from services.model.providers.failures import REQUEST_ID_FIELD
from tests.integration.provider_stack import ProviderStack, ask, spans_of_request
from tests.providers import anthropic_wire, schema_types

pytestmark = pytest.mark.integration


def _logged_ids(providers: ProviderStack, replica: str, request_id: str) -> list[str]:
    """The provider ids on the replica's log lines (json), waited for a little: a line is
    written as the call ends."""
    deadline = time.monotonic() + 10
    while True:
        text = (providers.log_dir / f"{replica}.log").read_text(errors="replace")
        found = []
        for line in text.splitlines():
            if not line.startswith("{"):
                continue
            record = json.loads(line)
            if record.get(REQUEST_ID_FIELD) == request_id:
                found.append(request_id)
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def _refused(providers: ProviderStack, request: pb.CompleteRequest) -> CachemeshError:
    """The Gateway's refusal of ``request`` (tenant-a's)."""
    with (
        Client(providers.stack.target, api_key=providers.stack.keys["tenant-a"]) as client,
        pytest.raises(CachemeshError) as caught,
    ):
        client.complete(request)
    return caught.value


@pytest.mark.parametrize(
    ("model", "api", "replica"),
    [("claude-sonnet-4-5", "anthropic", "anthropic-1"), ("gpt-5", "openai", "openai-1")],
)
def test_an_answers_provider_id_is_on_the_replicas_span_and_log(
    providers: ProviderStack, model: str, api: str, replica: str
) -> None:
    question = f"Provider id {uuid.uuid4().hex[:8]}"
    request = ask(model, question)
    request.request_id = uuid.uuid4().hex
    with Client(providers.stack.target, api_key=providers.stack.keys["tenant-a"]) as client:
        client.complete(request)
    (seen,) = [s for s in providers.server.seen_by(api) if question in str(s.body)]
    spans = spans_of_request(providers.stack, request.request_id, replica)
    assert seen.request_id in [s.attributes.get(REQUEST_ID_ATTRIBUTE) for s in spans]
    assert _logged_ids(providers, replica, seen.request_id) == [seen.request_id]


def test_a_refusals_provider_id_is_on_the_span_and_log_not_the_callers_error(
    providers: ProviderStack,
) -> None:
    providers.server.script(
        "anthropic", anthropic_wire.error(400, "invalid_request_error", "messages: refused")
    )
    question = f"Refused provider id {uuid.uuid4().hex[:8]}"
    request = ask("claude-sonnet-4-5", question)
    request.request_id = uuid.uuid4().hex
    refused = _refused(providers, request)
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT, refused
    (seen,) = [s for s in providers.server.seen_by("anthropic") if question in str(s.body)]
    assert seen.status == 400
    spans = spans_of_request(providers.stack, request.request_id, "anthropic-1")
    assert seen.request_id in [s.attributes.get(REQUEST_ID_ATTRIBUTE) for s in spans]
    assert _logged_ids(providers, "anthropic-1", seen.request_id) == [seen.request_id]
    assert seen.request_id not in str(refused)


def test_a_tool_name_claudes_api_refuses_never_reaches_it(providers: ProviderStack) -> None:
    question = f"Dotted tool {uuid.uuid4().hex[:8]}"
    request = ask("claude-sonnet-4-5", question)
    request.tools.append(pb.Tool(name="weather.get", input_schema_json='{"type": "object"}'))
    refused = _refused(providers, request)
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT, refused
    assert "tools[0].name: 'weather.get'" in str(refused)
    assert not [s for s in providers.server.seen_by("anthropic") if question in str(s.body)]


# BFCL's types at the top (``dict``) and only in a nested schema (an array's items, under a
# property whose own type is JSON Schema's): both refused by the loopback as by the API
_TYPED = [
    (
        {"type": "dict", "properties": {"x": {"type": "float"}}},
        "type: 'dict'",
        {"type": "object", "properties": {"x": {"type": "number"}}},
    ),
    (
        {"type": "object", "properties": {"x": {"type": "array", "items": {"type": "dict"}}}},
        "properties['x'].items.type: 'dict'",
        {"type": "object", "properties": {"x": {"type": "array", "items": {"type": "object"}}}},
    ),
]


@pytest.mark.parametrize(
    ("model", "api"), [("gpt-4-1", "openai"), ("claude-sonnet-4-5", "anthropic")]
)
@pytest.mark.parametrize(("schema", "where", "fixed"), _TYPED)
def test_a_tool_schema_type_the_api_refuses_never_reaches_it(
    providers: ProviderStack,
    model: str,
    api: str,
    schema: dict[str, object],
    where: str,
    fixed: dict[str, object],
) -> None:
    """BFCL's ``dict`` / ``float`` (not JSON Schema's types), at the top or only in a nested
    schema: refused by the Gateway, naming the tool and the field, before the provider's 400;
    the same tool as JSON Schema is sent and answered (the loopback server refuses the other
    form as the API does)."""
    assert schema_types.bad_type(schema) is not None and schema_types.bad_type(fixed) is None
    question = f"Typed tool {uuid.uuid4().hex[:8]}"
    request = ask(model, question)
    request.tools.append(pb.Tool(name="calc", input_schema_json=json.dumps(schema)))
    refused = _refused(providers, request)
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT, refused
    assert f"tools[0].input_schema_json: tool 'calc': {where}" in str(refused)
    assert not [s for s in providers.server.seen_by(api) if question in str(s.body)]
    del request.tools[:]
    request.tools.append(pb.Tool(name="calc", input_schema_json=json.dumps(fixed)))
    with Client(providers.stack.target, api_key=providers.stack.keys["tenant-a"]) as client:
        client.complete(request)
    (seen,) = [s for s in providers.server.seen_by(api) if question in str(s.body)]
    assert seen.status == 200
