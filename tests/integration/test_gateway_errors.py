"""Bad input on real processes: the right status, the field named, and no state changed."""

from __future__ import annotations

import uuid

import grpc
import pytest

from cachemesh import (
    AuthenticationError,
    Client,
    InvalidRequestError,
    NotFoundError,
    RateLimitError,
    RequestTooLargeError,
    build_request,
)
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import semantic_cache_pb2, semantic_cache_pb2_grpc
from services.tools.stack.health import SERVING, probe_as
from services.tools.stack.service_table import SERVICES
from tests.integration.harness import RunningStack

pytestmark = pytest.mark.integration


def _with(question: str, ns: str, **changes: object) -> pb.CompleteRequest:
    request = build_request(question, namespace=ns)
    for name, value in changes.items():
        setattr(request, name, value)
    return request


def _bad_requests(ns: str, question: str) -> dict[str, tuple[pb.CompleteRequest, str]]:
    no_messages = build_request(question, namespace=ns)
    del no_messages.messages[:]
    assistant_first = build_request(question, namespace=ns)
    assistant_first.messages[0].role = pb.ROLE_ASSISTANT
    empty_block = build_request(question, namespace=ns)
    empty_block.messages[0].content.append(pb.ContentBlock(text=""))
    orphan = build_request(question, namespace=ns)
    orphan.messages[0].content.append(
        pb.ContentBlock(tool_result=pb.ToolResult(tool_use_id="toolu_x", content="1"))
    )
    five = build_request(question, namespace=ns)
    for i in range(5):
        block = pb.ContentBlock(text=f"rule {i}")
        block.cache_control.SetInParent()
        five.system.append(block)
    threshold = build_request(question, namespace=ns)
    threshold.cache.threshold = 1.5
    return {
        "no messages": (no_messages, "messages"),
        "assistant first": (assistant_first, "messages[0].role"),
        "empty text block": (empty_block, "messages[0].content[1].text"),
        "orphan tool_result": (orphan, "tool_use_id"),
        "max_tokens 0": (_with(question, ns, max_tokens=0), "max_tokens"),
        "max_tokens too big": (_with(question, ns, max_tokens=10_000_000), "max_tokens"),
        "five breakpoints": (five, "cache_control"),
        "threshold": (threshold, "cache.threshold"),
    }


def test_bad_input_is_invalid_argument_naming_the_field_and_changes_nothing(
    client_a: Client, stack: RunningStack
) -> None:
    ns = uuid.uuid4().hex
    question = f"What is the baggage allowance on route {ns[:6]}?"
    before = stack.totals("tenant-a")
    for label, (request, field) in _bad_requests(ns, question).items():
        with pytest.raises(InvalidRequestError) as info:
            client_a.complete(request)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT, label
        assert field in info.value.message, (label, info.value.message)
    # an unknown model is NOT_FOUND (the providers' 404), still an InvalidRequestError
    with pytest.raises(NotFoundError) as missing:
        client_a.complete(_with(question, ns, model="gpt-17"))
    assert missing.value.code == grpc.StatusCode.NOT_FOUND and "model" in missing.value.message
    assert stack.totals("tenant-a") == before  # nothing billed
    first_valid = client_a.complete(build_request(question, namespace=ns))
    assert first_valid.served_by == pb.LAYER_MODEL  # nothing was stored by the bad ones


def test_a_prefill_is_allowed_and_bypasses_the_semantic_cache(client_a: Client) -> None:
    ns = uuid.uuid4().hex
    request = build_request("Say hello", namespace=ns)
    request.messages.append(
        pb.Message(role=pb.ROLE_ASSISTANT, content=[pb.ContentBlock(text="Hi")])
    )
    assert client_a.complete(request).served_by == pb.LAYER_MODEL
    assert client_a.complete(request).served_by == pb.LAYER_MODEL


def test_no_key_and_unknown_key_are_unauthenticated(stack: RunningStack) -> None:
    with Client(stack.target, api_key="cm_not-a-key") as client, pytest.raises(AuthenticationError):
        client.ask("hello")
    with grpc.insecure_channel(stack.target) as channel:
        stub = channel.unary_unary(
            "/cachemesh.v1.Gateway/Complete",
            request_serializer=pb.CompleteRequest.SerializeToString,
            response_deserializer=pb.CompleteResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as info:
            stub(build_request("hello"), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_internal_services_refuse_calls_without_the_internal_credential(
    stack: RunningStack,
) -> None:
    with stack.internal_channel("semantic-cache") as channel:
        stub = semantic_cache_pb2_grpc.SemanticCacheStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Lookup(
                semantic_cache_pb2.LookupRequest(tenant="tenant-a", request=build_request("x")),
                timeout=10,
            )
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_request_over_the_size_limit_is_resource_exhausted(client_a: Client) -> None:
    # over ROUTER_MAX_REQUEST_BYTES (2 MiB by default): the router's own refusal, naming it;
    # not a RateLimitError (no wait lifts it: `except RateLimitError: sleep; retry` looped)
    with pytest.raises(RequestTooLargeError, match="ROUTER_MAX_REQUEST_BYTES") as refused:
        client_a.ask("x" * (2 * 1024 * 1024 + 10))
    assert not isinstance(refused.value, RateLimitError)
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.value.reason == "REQUEST_TOO_LARGE"


def test_retry_id_reused_for_another_request_is_refused(client_a: Client) -> None:
    request_id = uuid.uuid4().hex
    client_a.complete(build_request("first question", request_id=request_id))
    with pytest.raises(InvalidRequestError, match="request_id"):
        client_a.complete(build_request("another question", request_id=request_id))


def test_every_service_reports_serving(stack: RunningStack) -> None:
    for spec in SERVICES:
        assert probe_as(spec.protocol, stack.addresses[spec.name], 10) == SERVING, spec.name
