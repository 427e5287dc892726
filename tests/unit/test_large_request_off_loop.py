"""A large request's Python walk over every block runs in a worker thread, not on the event
loop: the router's validation and semantic-cache's query derivation. A 900 kB request of
100,000 one-letter messages (refused later for its context window) held the router's loop
for 0.5-0.7 s and semantic-cache's for 0.3-0.6 s, every tenant's requests and health checks
with them. The tests look at which thread did the walk, not at times."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import AsyncIterator

import grpc
import pytest

from cachemesh import build_request
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import gateway_pb2_grpc
from cachemesh.v1 import semantic_cache_pb2 as sc
from services.common.errors import Code, RequestError
from services.router import servicer as servicer_module
from services.router.servicer import VALIDATE_IN_THREAD_BYTES
from services.semantic_cache import query as query_module
from services.semantic_cache.query import QUERY_IN_THREAD_BYTES, RecentQueries
from tests.unit.gateway_support import gateway_servicer
from tests.unit.test_router_answer_ledger import KEY
from tests.unit.test_router_unanswered_money import BilledPipeline


def _many_messages(count: int) -> pb.CompleteRequest:
    """A request of ``count`` one-letter turns and a last user question."""
    request = build_request("q", model="sim-small", max_tokens=16, request_id="r-1")
    last = request.messages.pop()
    for _ in range(count // 2):
        request.messages.add(role=pb.ROLE_USER).content.add(text="a")
        request.messages.add(role=pb.ROLE_ASSISTANT).content.add(text="b")
    request.messages.append(last)
    return request


@pytest.fixture
async def stub() -> AsyncIterator[gateway_pb2_grpc.GatewayAsyncStub]:
    servicer = gateway_servicer(BilledPipeline(), {KEY: "tenant-a"}, max_request_bytes=4 << 20)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 8 << 20)])
    gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 8 << 20)]
    )
    try:
        yield gateway_pb2_grpc.GatewayStub(channel)
    finally:
        await channel.close()
        await server.stop(0)


async def test_the_router_validates_a_large_request_off_its_event_loop(
    stub: gateway_pb2_grpc.GatewayAsyncStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop_thread = threading.current_thread()
    walked_on: list[bool] = []  # whether each validation ran on the loop's thread

    def validate(request: pb.CompleteRequest, *_: object) -> None:
        on_loop = threading.current_thread() is loop_thread
        assert on_loop or threading.current_thread().name.startswith("router-validate")
        walked_on.append(on_loop)
        raise RequestError(Code.INVALID_ARGUMENT, "seen")  # the test's end of the call

    monkeypatch.setattr(servicer_module, "validate_request", validate)
    large, small = _many_messages(30_000), _many_messages(10)
    assert large.ByteSize() > VALIDATE_IN_THREAD_BYTES >= small.ByteSize()
    for request in (large, small):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Complete(request, metadata=(("authorization", f"Bearer {KEY}"),))
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.details() == "seen"
    assert walked_on == [False, True]  # the large one in a worker thread, the small one not


async def test_semantic_cache_derives_a_large_requests_query_off_its_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop_thread = threading.current_thread()
    derive = query_module.query_from_request
    walked_on: list[bool] = []

    def recorded(
        tenant: str, request: pb.CompleteRequest, facts: sc.ModelFacts | None = None
    ) -> query_module.Query:
        on_loop = threading.current_thread() is loop_thread
        assert on_loop or threading.current_thread().name.startswith("semantic-query")
        walked_on.append(on_loop)
        return derive(tenant, request, facts)

    monkeypatch.setattr(query_module, "query_from_request", recorded)
    queries = RecentQueries()
    large, small = _many_messages(30_000), _many_messages(10)
    assert large.ByteSize() > QUERY_IN_THREAD_BYTES >= small.ByteSize()
    first = await queries.derived("t", large)
    assert walked_on == [False]
    assert first == derive("t", large)
    # held as before (its question is short): a repeat under another id is not walked again
    large.request_id = "r-2"
    again = await queries.derived("t", large)
    assert again.request_id == "r-2" and again.scope == first.scope
    assert walked_on == [False]
    await queries.derived("t", small)
    assert walked_on == [False, True]


def _scope_as_before(tenant: str, request: pb.CompleteRequest) -> str:
    """``scope_of`` as it was, one dumps of the whole canonical JSON: the digests must not
    change (the entries held are found by them)."""
    history = list(request.messages)
    last: list[object] = []
    if history and history[-1].role == pb.ROLE_USER:
        last = query_module.last_turn_layout(history.pop())
    fields = {
        "v": query_module.SCOPE_VERSION,
        "tenant": tenant,
        "namespace": request.cache.namespace,
        "model": request.model,
        "temperature": (request.temperature if request.HasField("temperature") else 1.0) + 0.0,
        "tools": [[t.name, t.description, t.input_schema_json] for t in request.tools],
        "system": [query_module._block(b) for b in request.system],
        "history": [[int(m.role), [query_module._block(b) for b in m.content]] for m in history],
        "last_turn": last,
    }
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@pytest.mark.parametrize("turns", [0, 1, 2, 255, 256, 257, 513, 3000])
def test_the_scope_hashed_a_slice_at_a_time_is_the_scope_it_was(turns: int) -> None:
    request = _many_messages(turns)
    request.messages[0].content.add(text='"history":"\\u0000history" \u00e9\u202e')
    request.cache.namespace = '\0history"history":"\\u0000history"'
    request.tools.add(name="t", input_schema_json='{"type": "object"}')
    request.system.add(text="be brief")
    request.temperature = 0.5
    assert query_module.scope_of("t", request) == _scope_as_before("t", request)
    request.messages.pop()  # the history's last turn an assistant's: in the history
    assert query_module.scope_of("t", request) == _scope_as_before("t", request)
