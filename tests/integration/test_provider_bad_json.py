"""JSON that Python's ``json`` reads but JSON does not have (NaN, Infinity, a number beyond a
double, a lone UTF-16 surrogate escape), in a tool schema or a tool call's input: the
providers' SDKs refuse to send it. It is the request's fault: INVALID_ARGUMENT naming the
field, no provider call, and no replica counted as failing (a client's retries of such a
request once ejected every healthy replica of the model)."""

from __future__ import annotations

import urllib.request
import uuid

import grpc
import pytest

from cachemesh import CachemeshError, Client
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2, model_pb2_grpc
from services.tools.stack.health import SERVING, probe
from tests.integration.provider_stack import ProviderStack, ask

pytestmark = pytest.mark.integration

NOT_JSON = {
    "NaN": '{"type": "object", "properties": {"n": {"type": "number", "maximum": NaN}}}',
    "Infinity": '{"type": "object", "properties": {"n": {"maximum": Infinity}}}',
    "-Infinity": '{"type": "object", "properties": {"n": {"minimum": -Infinity}}}',
    "1e999": '{"type": "object", "properties": {"n": {"maximum": 1e999}}}',
    "lone surrogate": '{"type": "object", "description": "cut \\ud83d"}',
}
MODELS = ("claude-sonnet-4-5", "gpt-4-1")


def _ejections(providers: ProviderStack) -> str:
    address = providers.stack.stack.metrics_addresses["router"]
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text: str = reply.read().decode()
    return "\n".join(
        line for line in text.splitlines() if line.startswith("cachemesh_router_replica_ejections")
    )


def _sent(providers: ProviderStack, tag: str) -> int:
    server = providers.server
    return sum(tag in str(s.body) for api in ("anthropic", "openai") for s in server.seen_by(api))


@pytest.mark.parametrize("model", MODELS)
def test_a_tool_schema_the_sdks_cannot_send_is_invalid_argument_and_no_replica_fails(
    providers: ProviderStack, model: str
) -> None:
    tag = f"bad schema {uuid.uuid4().hex[:8]}"
    before = _ejections(providers)
    with Client(providers.stack.target, api_key=providers.stack.keys["tenant-a"]) as client:
        for what, schema in NOT_JSON.items():
            request = ask(model, f"{tag} {what}")
            request.tools.append(pb.Tool(name="get", description="d", input_schema_json=schema))
            with pytest.raises(CachemeshError) as caught:
                client.complete(request)  # the client retries UNAVAILABLE: it was 5 calls
            assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT, (what, caught.value)
            assert caught.value.message.startswith(
                "tools[0].input_schema_json: must be standard JSON "
                "(no NaN/Infinity/lone surrogates)"
            ), caught.value.message
    assert _sent(providers, tag) == 0
    assert _ejections(providers) == before


def test_a_tool_calls_input_the_sdks_cannot_send_is_invalid_argument(
    providers: ProviderStack,
) -> None:
    tag = f"bad input {uuid.uuid4().hex[:8]}"
    use = pb.ToolUse(id="toolu_1", name="get", input_json='{"n": NaN}')
    request = ask("gpt-4-1", tag)
    request.tools.append(pb.Tool(name="get", input_schema_json='{"type": "object"}'))
    request.messages.extend(
        [
            pb.Message(role=pb.ROLE_ASSISTANT, content=[pb.ContentBlock(tool_use=use)]),
            pb.Message(
                role=pb.ROLE_USER,
                content=[
                    pb.ContentBlock(tool_result=pb.ToolResult(tool_use_id="toolu_1", content="3"))
                ],
            ),
        ]
    )
    client = Client(providers.stack.target, api_key=providers.stack.keys["tenant-a"])
    with client, pytest.raises(CachemeshError) as caught:
        client.complete(request)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.message.startswith(
        "messages[1].content[0].tool_use.input_json: must be standard JSON"
    ), caught.value.message
    assert _sent(providers, tag) == 0


@pytest.mark.parametrize(
    ("replica", "model"), [("anthropic-1", MODELS[0]), ("openai-1", MODELS[1])]
)
def test_a_replica_asked_for_json_its_sdk_cannot_send_refuses_the_request_not_itself(
    providers: ProviderStack, replica: str, model: str
) -> None:
    """The replica's own defence, past the router's validation (a caller with the internal
    credential, or a router of an older version): the SDK's ValueError / UnicodeEncodeError
    while it encodes the body is INVALID_ARGUMENT, not UNAVAILABLE "retry later"."""
    address = providers.replicas[replica]
    metadata = (("x-cachemesh-internal", providers.stack.internal_token),)
    tag = f"replica's own check {uuid.uuid4().hex[:8]}"
    with grpc.insecure_channel(address) as channel:
        stub = model_pb2_grpc.ModelStub(channel)
        for what, schema in NOT_JSON.items():
            request = ask(model, f"{tag} {what}")
            request.tools.append(pb.Tool(name="get", input_schema_json=schema))
            call = model_pb2.GenerateRequest(tenant="tenant-a", model=model, request=request)
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.Generate(call, metadata=metadata, timeout=20))
            error: grpc.Call = caught.value  # type: ignore[assignment]
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (what, error.details())
            assert "could not be sent" in (error.details() or ""), error.details()
    assert probe(address) == SERVING
    assert _sent(providers, tag) == 0
