"""The semantic-cache process: configuration fails fast; health turns SERVING after warm-up."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import semantic_cache_pb2 as sc
from cachemesh.v1 import semantic_cache_pb2_grpc as sc_grpc
from services.common.auth import internal_metadata
from services.common.env import ConfigError, Env
from services.semantic_cache.app import SERVICE_NAME, serve
from services.semantic_cache.operating_point import OperatingPoint
from services.semantic_cache.policy import NamespacePolicy
from services.semantic_cache.settings import SemanticCacheSettings
from services.tools.stack.ports import free_port
from tests.unit.semantic_cache_support import make_request

TOKEN = "test-internal-token-0123456789"


SHIPPED = OperatingPoint(0.87, 0.3, 0.02)


def test_defaults_come_from_the_shipped_operating_point() -> None:
    config = SemanticCacheSettings.from_env(Env({}), SHIPPED)
    assert config == SemanticCacheSettings(
        0.87, 0.3, 0.02, 86_400.0, 100_000, 1, 1, policy=NamespacePolicy(), lease_s=30.0
    )


def test_the_shipped_operating_point_file_loads() -> None:
    point = OperatingPoint.load()
    assert 0.0 < point.threshold < 1.0 and 0.0 <= point.min_probability <= 1.0


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SEMANTIC_CACHE_THRESHOLD", "1.2"),
        ("SEMANTIC_CACHE_THRESHOLD", "-0.1"),
        ("SEMANTIC_CACHE_THRESHOLD", "nan"),
        ("SEMANTIC_CACHE_VERIFIER_MIN_P", "1.5"),
        ("SEMANTIC_CACHE_AMBIGUITY_MARGIN", "-0.01"),
        ("SEMANTIC_CACHE_LEASE_S", "0"),
        ("SEMANTIC_CACHE_ANN_NPROBE", "0"),
        ("SEMANTIC_CACHE_EMBED_MAX_BATCH", "0"),
        ("SEMANTIC_CACHE_EMBED_MAX_QUEUE", "0"),
        ("SEMANTIC_CACHE_EMBED_MAX_QUEUE_PER_TENANT", "0"),
        ("SEMANTIC_CACHE_LEASE_WAIT_S", "-1"),
        ("SEMANTIC_CACHE_MAX_TEMPERATURE", "-0.5"),
        ("SEMANTIC_CACHE_TTL_S", "0"),
        ("SEMANTIC_CACHE_MAX_ENTRIES", "0"),
        ("SEMANTIC_CACHE_FAISS_THREADS", "0"),
        ("SEMANTIC_CACHE_ORT_THREADS", "two"),
        ("SEMANTIC_CACHE_ORT_SOLO_THREADS", "-1"),
        ("SEMANTIC_CACHE_ANN_MIN_ENTRIES", "8"),  # fewer points than an IVF's 16 lists
        # past a C int: an OverflowError from FAISS or onnxruntime naming nothing, exit 1
        ("SEMANTIC_CACHE_FAISS_THREADS", "3000000000"),
        ("SEMANTIC_CACHE_ORT_THREADS", "3000000000"),
        ("SEMANTIC_CACHE_ORT_SOLO_THREADS", "3000000000"),
        ("SEMANTIC_CACHE_FAISS_THREADS", "257"),  # more threads than any machine has cores
        ("SEMANTIC_CACHE_ANN_NPROBE", str(2**64)),  # FAISS's size_t: every IVF build failed
        ("SEMANTIC_CACHE_TTL_S", "1e306"),  # would overflow every Store's expiry
        ("SEMANTIC_CACHE_NAMESPACE_TTL_S", "docs=1e306"),
        # nothing was ever served: an entry expired as it was stored (whole milliseconds)
        ("SEMANTIC_CACHE_TTL_S", "5e-324"),
        ("SEMANTIC_CACHE_TTL_S", "0.5"),
        ("SEMANTIC_CACHE_NAMESPACE_TTL_S", "docs=5e-324"),
    ],
)
def test_a_bad_setting_names_its_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        SemanticCacheSettings.from_env(Env({name: value}), SHIPPED)


async def test_the_internal_token_is_required() -> None:
    with pytest.raises(ConfigError, match="CACHEMESH_INTERNAL_TOKEN"):
        await serve({"OTEL_SDK_DISABLED": "true"})


async def test_a_byte_bound_too_small_for_one_entry_stops_the_start() -> None:
    """Read against the embedder it loads (384 dimensions): 1024 bytes started, then stored
    nothing (every Store refused as larger than all of L1 may hold)."""
    environ = {
        "SEMANTIC_CACHE_LISTEN": f"127.0.0.1:{free_port()}",
        "SEMANTIC_CACHE_METRICS_LISTEN": "127.0.0.1:0",
        "CACHEMESH_INTERNAL_TOKEN": TOKEN,
        "OTEL_TRACES_EXPORTER": "none",
        "SEMANTIC_CACHE_MAX_BYTES": "1024",
    }
    with pytest.raises(ConfigError, match="SEMANTIC_CACHE_MAX_BYTES must be at least 68,772"):
        await asyncio.wait_for(serve(environ), timeout=60)


async def test_serves_after_loading_the_model() -> None:
    address = f"127.0.0.1:{free_port()}"
    environ = {
        "SEMANTIC_CACHE_LISTEN": address,
        "SEMANTIC_CACHE_METRICS_LISTEN": "127.0.0.1:0",  # any free port
        "CACHEMESH_INTERNAL_TOKEN": TOKEN,
        "OTEL_TRACES_EXPORTER": "none",
        "CACHEMESH_GRACE_S": "0",
    }
    stop = asyncio.Event()
    task = asyncio.create_task(serve(environ, stop))
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            check = channel.unary_unary(
                "/grpc.health.v1.Health/Check",
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
            serving = health_pb2.HealthCheckResponse.SERVING
            status: int = health_pb2.HealthCheckResponse.UNKNOWN
            for _ in range(300):
                try:
                    reply = await check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
                    status = reply.status
                except grpc.aio.AioRpcError:
                    pass
                if status == serving or task.done():
                    break
                await asyncio.sleep(0.05)
            assert status == serving
            stub = sc_grpc.SemanticCacheStub(channel)
            auth = internal_metadata(TOKEN)
            request = make_request("How do I reset my password?")
            answer = sc.CachedAnswer(
                content=[pb.ContentBlock(text="Open Settings.")],
                stop_reason="end_turn",
                output_tokens=5,
            )
            store = sc.StoreRequest(tenant="a", request=request, answer=answer)
            assert (await stub.Store(store, metadata=auth)).stored
            paraphrase = make_request("I forgot my password, how can I change it?")
            found = await stub.Lookup(
                sc.LookupRequest(tenant="a", request=paraphrase), metadata=auth
            )
            assert found.hit and not found.match.exact and found.match.similarity >= 0.88
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=10)


def test_a_tenants_part_of_the_embedding_queue_is_half_of_it_and_at_most_all() -> None:
    half = SemanticCacheSettings.from_env(Env({"SEMANTIC_CACHE_EMBED_MAX_QUEUE": "16"}), SHIPPED)
    assert (half.embed_max_queue, half.embed_max_queue_per_tenant) == (16, 8)
    whole = {
        "SEMANTIC_CACHE_EMBED_MAX_QUEUE": "1",
        "SEMANTIC_CACHE_EMBED_MAX_QUEUE_PER_TENANT": "1",
    }
    assert SemanticCacheSettings.from_env(Env(whole), SHIPPED).embed_max_queue_per_tenant == 1
    over = {
        "SEMANTIC_CACHE_EMBED_MAX_QUEUE": "16",
        "SEMANTIC_CACHE_EMBED_MAX_QUEUE_PER_TENANT": "17",
    }
    with pytest.raises(
        ConfigError, match="PER_TENANT must be at most SEMANTIC_CACHE_EMBED_MAX_QUEUE"
    ):
        SemanticCacheSettings.from_env(Env(over), SHIPPED)
