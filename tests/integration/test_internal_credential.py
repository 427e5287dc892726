"""Every internal service refuses a caller without the router's exact internal credential.

One service checked alone would miss a check that accepts any non-empty token elsewhere; here
each internal service gets a well-formed request with no token, an empty one, and the real
token with its last character changed, and must refuse all three (UNAUTHENTICATED) while the
real token is let through.
"""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.message import Message

from cachemesh import build_request
from cachemesh.v1 import model_pb2, prefix_cache_pb2, semantic_cache_pb2
from tests.integration.harness import RunningStack

pytestmark = pytest.mark.integration

_CALLS: dict[str, tuple[str, Message, bool]] = {
    "semantic-cache": (
        "/cachemesh.v1.SemanticCache/Lookup",
        semantic_cache_pb2.LookupRequest(tenant="tenant-a", request=build_request("Hi there")),
        False,
    ),
    "prefix-cache": (
        "/cachemesh.v1.PrefixCache/Totals",
        prefix_cache_pb2.TotalsRequest(tenant="tenant-a"),
        False,
    ),
    "model": (
        "/cachemesh.v1.Model/Generate",
        model_pb2.GenerateRequest(
            tenant="tenant-a", model="sim-large", request=build_request("Hi there")
        ),
        True,
    ),
}


def _call(address: str, method: str, request: Message, streaming: bool, token: str | None) -> None:
    metadata = () if token is None else (("x-cachemesh-internal", token),)
    raw = lambda b: b  # noqa: E731 - bytes in, bytes out
    with grpc.insecure_channel(address) as channel:
        if streaming:
            stream = channel.unary_stream(method, request_serializer=raw, response_deserializer=raw)
            list(stream(request.SerializeToString(), metadata=metadata, timeout=20))
        else:
            unary = channel.unary_unary(method, request_serializer=raw, response_deserializer=raw)
            unary(request.SerializeToString(), metadata=metadata, timeout=20)


@pytest.mark.parametrize("service", sorted(_CALLS))
def test_an_internal_service_takes_only_the_exact_internal_token(
    stack: RunningStack, service: str
) -> None:
    method, request, streaming = _CALLS[service]
    real = stack.internal_token
    near = real[:-1] + ("x" if real[-1] != "x" else "y")
    processes = ["model", "model-2"] if service == "model" else [service]  # both replicas
    addresses = [stack.addresses[name] for name in processes]
    for address in addresses:
        for token in (None, "", near):
            with pytest.raises(grpc.RpcError) as refused:
                _call(address, method, request, streaming, token)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, (address, token)
        _call(address, method, request, streaming, real)  # the real token passes
