"""The secrets the Python clients send (``api_key``, ``admin_token``), against fake servers (a
real gRPC server in this process): a key read from a file with its newline is sent without it;
one gRPC cannot send is a ValueError naming the parameter, never showing the secret."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from cachemesh import AsyncClient, Client, build_request
from cachemesh.admin import AdminClient
from cachemesh.v1 import admin_pb2 as adm
from cachemesh.v1 import gateway_pb2 as pb

SECRET = "cm_live_0123456789abcdef"


@pytest.fixture
def server() -> Iterator[tuple[list[str], str]]:
    """Gateway.Complete and Admin.GetStats, recording each call's ``authorization``."""
    seen: list[str] = []

    def record(answer: Any) -> Callable[[Any, Any], Any]:
        def handle(request: Any, context: Any) -> Any:
            seen.extend(v for k, v in context.invocation_metadata() if k == "authorization")
            return answer

        return handle

    handlers: dict[str, dict[str, grpc.RpcMethodHandler[Any, Any]]] = {
        "cachemesh.v1.Gateway": {
            "Complete": grpc.unary_unary_rpc_method_handler(
                record(pb.CompleteResponse(stop_reason="end_turn")),
                request_deserializer=pb.CompleteRequest.FromString,
                response_serializer=pb.CompleteResponse.SerializeToString,
            )
        },
        "cachemesh.v1.Admin": {
            "GetStats": grpc.unary_unary_rpc_method_handler(
                record(adm.GetStatsResponse()),
                request_deserializer=adm.GetStatsRequest.FromString,
                response_serializer=adm.GetStatsResponse.SerializeToString,
            )
        },
    }
    grpc_server = grpc.server(futures.ThreadPoolExecutor(2))
    grpc_server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(name, methods) for name, methods in handlers.items()]
    )
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    yield seen, f"127.0.0.1:{port}"
    grpc_server.stop(None)


def _sync(target: str, key: str) -> None:
    with Client(target, api_key=key, timeout_s=10, max_attempts=1) as client:
        client.complete(build_request("hi"))


def _aio(target: str, key: str) -> None:
    async def call() -> None:
        async with AsyncClient(target, api_key=key, timeout_s=10, max_attempts=1) as client:
            await client.complete(build_request("hi"))

    asyncio.run(call())


def _admin(target: str, token: str) -> None:
    with AdminClient(target, admin_token=token, timeout_s=10) as client:
        client.stats()


CLIENTS = [(_sync, "api_key"), (_aio, "api_key"), (_admin, "admin_token")]
IDS = ["Client", "AsyncClient", "AdminClient"]


@pytest.mark.parametrize(("call", "parameter"), CLIENTS, ids=IDS)
@pytest.mark.parametrize("written", [f"{SECRET}\n", f"  {SECRET}\r\n", f"\t{SECRET} "])
def test_a_secret_read_with_its_newline_is_sent_without_it(
    server: tuple[list[str], str],
    call: Callable[[str, str], None],
    parameter: str,
    written: str,
) -> None:
    seen, target = server
    call(target, written)  # as open("key.txt").read() gives it
    assert seen == [f"Bearer {SECRET}"]


@pytest.mark.parametrize(("call", "parameter"), CLIENTS, ids=IDS)
@pytest.mark.parametrize(
    "bad", [f"{SECRET[:8]}\n{SECRET[8:]}", f"{SECRET}\x00", f"{SECRET[:8]} {SECRET[8:]}", "cm_é"]
)
def test_a_secret_grpc_cannot_send_is_a_value_error_naming_the_parameter(
    server: tuple[list[str], str],
    call: Callable[[str, str], None],
    parameter: str,
    bad: str,
) -> None:
    seen, target = server
    with pytest.raises(ValueError, match=parameter) as caught:
        call(target, bad)
    assert SECRET[:8] not in str(caught.value) and "cm_" not in str(caught.value)
    assert seen == []
