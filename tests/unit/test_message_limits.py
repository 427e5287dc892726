"""The message-size settings agree with each other at start-up: a request the router (or the
HTTP front) takes fits the messages the services pass it on in. ROUTER_MAX_REQUEST_BYTES at
8 MiB beside the services' 4 MiB started, and every request between 4 and 8 MiB failed
RESOURCE_EXHAUSTED inside the stack with gRPC's "Received message larger than max"."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from opentelemetry import trace

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import semantic_cache_pb2 as sc
from services.common.channels import server_options
from services.common.env import ConfigError, Env
from services.common.models import load_model_table
from services.common.server import ServerSettings
from services.http_front.settings import HttpFrontSettings
from services.model.settings import ModelSettings
from services.prefix_cache.settings import PrefixCacheSettings
from services.router.grpc_adapters import connect
from services.router.settings import RouterSettings

MIB = 1 << 20


BASE = {
    "MODEL_REPLICAS": "sim-small=127.0.0.1:50054,sim-large=127.0.0.1:50055",
    "CACHEMESH_INTERNAL_TOKEN": "t" * 32,
    "CACHEMESH_API_KEYS_FILE": "/dev/null",
}


def _router(**env: str) -> RouterSettings:
    return RouterSettings.from_env(Env({**BASE, **env}), load_model_table())


def test_a_request_limit_over_the_services_message_limit_is_refused_naming_both() -> None:
    with pytest.raises(ConfigError) as refused:
        _router(ROUTER_MAX_REQUEST_BYTES=str(8 * MIB))
    message = str(refused.value)
    assert "ROUTER_MAX_REQUEST_BYTES (8388608)" in message
    assert "CACHEMESH_MAX_MESSAGE_BYTES (4194304)" in message
    # past what gRPC takes (a C int): an OverflowError naming nothing, exit 1
    with pytest.raises(ConfigError, match="ROUTER_MAX_REQUEST_BYTES"):
        _router(ROUTER_MAX_REQUEST_BYTES="3000000000")
    raised = _router(
        ROUTER_MAX_REQUEST_BYTES=str(8 * MIB), CACHEMESH_MAX_MESSAGE_BYTES=str(16 * MIB)
    )
    assert raised.max_request_bytes == 8 * MIB and raised.server.send_limit == 16 * MIB
    # gRPC reads twice the request limit: the router refuses a request between them itself
    assert raised.server.max_message_bytes == 16 * MIB


def test_a_request_limit_over_half_the_message_limit_is_refused_saying_why() -> None:
    # at the message limit itself the router took requests whose model call (the request
    # and its KV block hashes, 2 bytes a token) was over it: gRPC's "Sent message larger
    # than max" from inside the stack for every request over ~73% of the limit
    with pytest.raises(ConfigError) as refused:
        _router(ROUTER_MAX_REQUEST_BYTES=str(MIB // 2), CACHEMESH_MAX_MESSAGE_BYTES=str(MIB // 2))
    message = str(refused.value)
    assert "ROUTER_MAX_REQUEST_BYTES (524288) must be at most half" in message
    assert "CACHEMESH_MAX_MESSAGE_BYTES (524288), 262144" in message
    assert "KV block hashes, 2 bytes a token" in message and "at least 1048576" in message
    with pytest.raises(ConfigError, match=r"ROUTER_MAX_REQUEST_BYTES \(2097153\)"):
        _router(ROUTER_MAX_REQUEST_BYTES=str(2 * MIB + 1))
    # a message limit leaving less than the least request limit names what to raise it to
    with pytest.raises(ConfigError) as tiny:
        _router(CACHEMESH_MAX_MESSAGE_BYTES="2047")
    assert "CACHEMESH_MAX_MESSAGE_BYTES (2047)" in str(tiny.value)
    assert "to at least 2048" in str(tiny.value)
    assert _router(CACHEMESH_MAX_MESSAGE_BYTES="2048").max_request_bytes == 1024
    assert _router(ROUTER_MAX_REQUEST_BYTES=str(2 * MIB)).max_request_bytes == 2 * MIB


def test_the_default_request_limit_is_half_a_lowered_message_limit() -> None:
    lowered = _router(CACHEMESH_MAX_MESSAGE_BYTES=str(MIB // 2))
    assert lowered.max_request_bytes == MIB // 4 and lowered.server.send_limit == MIB // 2
    assert _router(CACHEMESH_MAX_MESSAGE_BYTES=str(2 * MIB)).max_request_bytes == MIB
    # 2 MiB: a 200k-token prompt of ordinary text (3.7-4.9 bytes a cl100k token) fits
    assert _router().max_request_bytes == 2 * MIB


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"CACHEMESH_MAX_MESSAGE_BYTES": str(MIB // 4)},
        {"CACHEMESH_MAX_MESSAGE_BYTES": str(3 * MIB)},
        {"CACHEMESH_MAX_MESSAGE_BYTES": str(16 * MIB)},
        {"CACHEMESH_MAX_MESSAGE_BYTES": str(16 * MIB), "ROUTER_MAX_REQUEST_BYTES": str(8 * MIB)},
        {"ROUTER_MAX_REQUEST_BYTES": str(MIB), "HTTP_FRONT_MAX_BODY_BYTES": str(MIB)},
    ],
)
def test_the_message_limits_agree_along_the_path(env: dict[str, str]) -> None:
    """HTTP front -> router -> semantic-cache, prefix-cache's Plan, a model's Generate: a
    request one hop takes is never refused by the next hop's transport, and the router reads
    (gRPC's limit) more than it takes, so that it refuses a request over its own limit
    itself, naming the setting."""
    router = _router(**env)
    full = {**BASE, **env}
    front = HttpFrontSettings.from_env(full)
    hops = [
        ServerSettings.from_env(Env(full), "SEMANTIC_CACHE", "127.0.0.1:0"),
        PrefixCacheSettings.from_env(Env(full)).server,
        ModelSettings.from_env(full).server,
    ]
    # the front sends a request of at most its limit, measured as the router measures its own
    # (serialized), as one message
    assert front.max_body_bytes <= router.max_request_bytes
    assert front.max_body_bytes <= front.max_message_bytes
    # the router reads twice what it takes, no more than any service's message limit
    assert router.server.max_message_bytes == 2 * router.max_request_bytes
    assert router.server.max_message_bytes <= router.server.send_limit
    for hop in hops:
        # each call on carries the request with fields of its own (Plan's answer, 2 bytes a
        # token of hashes): half the next hop's limit is the request's share
        assert 2 * router.max_request_bytes <= hop.max_message_bytes
        assert router.server.send_limit == hop.max_message_bytes


async def test_the_routers_calls_to_its_dependencies_carry_what_it_accepts() -> None:
    # the router's channels were fixed at 8 MiB: with both limits raised past it, a 9 MB
    # request passed the router's check, then every call on failed "CLIENT: Sent message
    # larger than max"
    received: list[int] = []

    async def lookup(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        received.append(len(request))
        return sc.LookupResponse(hit=False).SerializeToString()

    handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(lookup)
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", 64 * MIB), *server_options()]
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("cachemesh.v1.SemanticCache", {"Lookup": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    settings = _router(
        ROUTER_MAX_REQUEST_BYTES=str(12 * MIB),
        CACHEMESH_MAX_MESSAGE_BYTES=str(24 * MIB),
        SEMANTIC_CACHE_ADDR=f"127.0.0.1:{port}",
    )
    connected = connect(settings, trace.get_tracer("test"))
    try:
        request = pb.CompleteRequest(model="sim-small", max_tokens=16)
        request.messages.add(role=pb.ROLE_USER).content.add(text="x" * (9 * MIB))
        reply = await connected.semantic.Lookup(
            sc.LookupRequest(tenant="t", request=request), timeout=30
        )
        assert not reply.hit and received and received[0] > 9 * MIB
    finally:
        await connected.close()
        await server.stop(0)
