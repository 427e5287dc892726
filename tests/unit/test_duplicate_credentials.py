"""A credential's header sent twice is refused UNAUTHENTICATED: which copy to check is a guess.

The internal credential's check read the last ``x-cachemesh-internal`` (a wrong one then the
right one: accepted; the right one then a wrong one: refused), the API key's and the admin
token's the first ``authorization``: a proxy or a client library that adds its own copy of a
header decided, unseen, which credential a call ran under. Each now refuses a call carrying
its header more than once, saying so.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from cachemesh import build_request
from cachemesh.v1 import admin_pb2 as adm
from cachemesh.v1 import semantic_cache_pb2 as sc
from cachemesh.v1 import semantic_cache_pb2_grpc as sc_grpc
from services.common.auth import (
    INTERNAL_METADATA_KEY,
    AmbiguousCredential,
    InternalAuthInterceptor,
    bearer_token,
)
from services.common.clock import ManualClock
from services.router.admin_auth import AdminCredential
from services.semantic_cache.api import SemanticCacheApi
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.servicer import SemanticCacheService
from tests.unit.gateway_support import gateway_servicer
from tests.unit.semantic_cache_support import FakeEmbedder
from tests.unit.test_router_admin import ADMIN_TOKEN, _rig
from tests.unit.test_router_answer_ledger import (
    KEY,
    Aborted,
    FakePipeline,
    Metadatum,
)
from tests.unit.test_semantic_cache_grpc import TOKEN, expect, start

WRONG = "wrong-internal-token-0123456789"


@pytest.fixture
async def stub() -> AsyncIterator[sc_grpc.SemanticCacheAsyncStub]:
    cache = SemanticCache(FakeEmbedder(), ManualClock(), threshold=0.8)
    server, port = await start(SemanticCacheService(SemanticCacheApi(cache)))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield sc_grpc.SemanticCacheStub(channel)
    await server.stop(None)


@pytest.mark.parametrize(
    "values", [(WRONG, TOKEN), (TOKEN, WRONG), (TOKEN, TOKEN), ("", TOKEN), (TOKEN, TOKEN, TOKEN)]
)
async def test_the_internal_credential_sent_twice_is_refused(
    stub: sc_grpc.SemanticCacheAsyncStub, values: tuple[str, ...]
) -> None:
    metadata = tuple((INTERNAL_METADATA_KEY, value) for value in values if value)
    if len(metadata) < 2:  # an empty value: gRPC sends no such entry
        metadata = ((INTERNAL_METADATA_KEY, TOKEN),) * 2
    call = stub.Stats(sc.L1StatsRequest(), metadata=metadata)
    details = await expect(grpc.StatusCode.UNAUTHENTICATED, call)
    assert f"{len(metadata)} times" in details and INTERNAL_METADATA_KEY in details
    assert TOKEN not in details and WRONG not in details
    once = await stub.Stats(sc.L1StatsRequest(), metadata=((INTERNAL_METADATA_KEY, TOKEN),))
    assert list(once.tenants) == []


async def test_a_streaming_call_with_the_internal_credential_twice_is_refused_too() -> None:
    """The interceptor's refusal of a server-streaming method (the model service's)."""
    handler: grpc.RpcMethodHandler[object, object] = grpc.unary_stream_rpc_method_handler(_never)

    async def continuation(
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[object, object]:
        return handler

    class Details:
        method = "/cachemesh.v1.Model/Stream"
        invocation_metadata = ((INTERNAL_METADATA_KEY, TOKEN), (INTERNAL_METADATA_KEY, TOKEN))

    interceptor = InternalAuthInterceptor(TOKEN)
    refused = await interceptor.intercept_service(continuation, Details())  # type: ignore[arg-type]
    assert refused is not None and refused is not handler and refused.response_streaming


async def _never(request: object, context: object) -> AsyncIterator[object]:
    raise AssertionError("the handler ran")
    yield  # pragma: no cover


def test_bearer_token_refuses_two_authorization_headers() -> None:
    one = (Metadatum("authorization", "Bearer abc"),)
    assert bearer_token(one) == "abc"
    for two in (
        (*one, Metadatum("authorization", "Bearer xyz")),
        (*one, Metadatum("Authorization", "Bearer abc")),
        (*one, Metadatum("authorization", "Basic Zm9vOmJhcg==")),
    ):
        with pytest.raises(AmbiguousCredential, match="authorization header is sent 2 times"):
            bearer_token(two)


async def test_the_admin_token_sent_twice_is_refused(tmp_path: Path) -> None:
    async for rig in _rig(tmp_path, AdminCredential(ADMIN_TOKEN)):
        for other in (rig.demo_key, ADMIN_TOKEN):
            metadata = (
                ("authorization", f"Bearer {other}"),
                ("authorization", f"Bearer {ADMIN_TOKEN}"),
            )
            call = rig.stub.ListKeys(adm.ListKeysRequest(), metadata=metadata)
            details = await expect(grpc.StatusCode.UNAUTHENTICATED, call)
            assert "sent 2 times" in details and ADMIN_TOKEN not in details
        once = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
        assert [
            k.tenant for k in (await rig.stub.ListKeys(adm.ListKeysRequest(), metadata=once)).keys
        ] == ["acme"]


class Context:
    def __init__(self, *metadata: tuple[str, str]) -> None:
        self._metadata = tuple(Metadatum(k, v) for k, v in metadata)
        self.status: grpc.StatusCode | None = None
        self.message = ""

    def invocation_metadata(self) -> tuple[Metadatum, ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None

    def done(self) -> bool:
        return False

    async def abort(self, code: grpc.StatusCode, message: str, **_: object) -> None:
        self.status, self.message = code, message
        raise Aborted(message)

    def code(self) -> grpc.StatusCode | None:
        return self.status


def test_an_api_key_sent_twice_is_refused() -> None:
    async def run() -> None:
        pipeline = FakePipeline()
        servicer = gateway_servicer(pipeline, {KEY: "tenant-a"})
        request = build_request("What is a KV cache?", model="sim-small")
        twice = Context(
            ("authorization", "Bearer k-other-0123456789"), ("authorization", f"Bearer {KEY}")
        )
        with pytest.raises(Aborted):
            await servicer.Complete(request, twice)  # type: ignore[arg-type]
        assert twice.status == grpc.StatusCode.UNAUTHENTICATED
        assert "sent 2 times" in twice.message and KEY not in twice.message
        assert pipeline.runs == 0
        once = Context(("authorization", f"Bearer {KEY}"))
        answer = await servicer.Complete(request, once)  # type: ignore[arg-type]
        assert answer.content[0].text == "answer 1"

    asyncio.run(run())
