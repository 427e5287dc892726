"""The semantic-cache process with SEMANTIC_CACHE_DATA_DIR: its entries survive a restart."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

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
from services.semantic_cache.persistence import SNAPSHOT_NAME
from services.semantic_cache.settings import SemanticCacheSettings
from tests.unit.semantic_cache_support import make_request

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "test-internal-token-0123456789"
SHIPPED = OperatingPoint(0.88, 0.0, 0.0)
QUESTION = "How do I export my invoices as PDF?"


def environ(data_dir: Path) -> dict[str, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return {
        "SEMANTIC_CACHE_LISTEN": f"127.0.0.1:{port}",
        "SEMANTIC_CACHE_METRICS_LISTEN": "127.0.0.1:0",  # any free port
        "CACHEMESH_INTERNAL_TOKEN": TOKEN,
        "OTEL_TRACES_EXPORTER": "none",
        "CACHEMESH_GRACE_S": "0",
        "SEMANTIC_CACHE_DATA_DIR": str(data_dir),
        "SEMANTIC_CACHE_SNAPSHOT_S": "0",  # only at shutdown: the restart proves the stop path
    }


async def wait_serving(channel: grpc.aio.Channel, task: asyncio.Task[None]) -> None:
    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    for _ in range(600):
        if task.done():
            task.result()
            raise AssertionError("serve() returned before SERVING")
        try:
            reply = await check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError("not SERVING in time")


async def run_once(env: dict[str, str], *, store: bool) -> sc.LookupResponse:
    """Starts the service, optionally stores QUESTION, looks it up, then stops it (SIGTERM path)."""
    stop = asyncio.Event()
    task = asyncio.create_task(serve(env, stop))
    try:
        async with grpc.aio.insecure_channel(env["SEMANTIC_CACHE_LISTEN"]) as channel:
            await wait_serving(channel, task)
            stub = sc_grpc.SemanticCacheStub(channel)
            auth = internal_metadata(TOKEN)
            if store:
                answer = sc.CachedAnswer(
                    content=[pb.ContentBlock(text="Open Settings.")],
                    stop_reason="end_turn",
                    output_tokens=7,
                )
                request = sc.StoreRequest(
                    tenant="t1", request=make_request(QUESTION), answer=answer
                )
                assert (await stub.Store(request, metadata=auth)).stored
            lookup = sc.LookupRequest(tenant="t1", request=make_request(QUESTION))
            return await stub.Lookup(lookup, metadata=auth)
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=30)


async def test_an_exact_hit_is_served_after_a_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "semantic-cache"  # created by the service
    first = await run_once(environ(data_dir), store=True)
    assert first.hit and first.match.exact
    assert (data_dir / SNAPSHOT_NAME).is_file()  # written at shutdown, after the drain
    second = await run_once(environ(data_dir), store=False)
    assert second.hit and second.match.exact and second.match.similarity == 1.0
    assert second.match.entry_id == first.match.entry_id
    assert second.answer.output_tokens == 7


def test_a_corrupt_snapshot_stops_the_process_naming_the_file(tmp_path: Path) -> None:
    # A real process: a failed warm-up must end it (with the error), not leave it serving.
    snapshot = tmp_path / SNAPSHOT_NAME
    snapshot.write_bytes(b'{"format": "something else"}\n')
    result = subprocess.run(
        [sys.executable, "-m", "services.semantic_cache"],
        cwd=ROOT,
        env={**environ(tmp_path), "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    assert f"SnapshotError: semantic-cache snapshot {snapshot}: unreadable" in result.stderr
    assert snapshot.read_bytes() == b'{"format": "something else"}\n'  # never overwritten


async def test_an_unusable_data_dir_fails_fast_naming_the_variable(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(ConfigError, match="SEMANTIC_CACHE_DATA_DIR"):
        await serve(environ(tmp_path / "file" / "cache"))


@pytest.mark.parametrize("value", ["-1", "soon"])
def test_a_bad_snapshot_period_names_its_variable(value: str) -> None:
    with pytest.raises(ConfigError, match="SEMANTIC_CACHE_SNAPSHOT_S"):
        SemanticCacheSettings.from_env(Env({"SEMANTIC_CACHE_SNAPSHOT_S": value}), SHIPPED)


def test_persistence_is_off_unless_a_data_dir_is_set() -> None:
    blank = SemanticCacheSettings.from_env(Env({"SEMANTIC_CACHE_DATA_DIR": " "}), SHIPPED)
    assert blank.data_dir is None
    config = SemanticCacheSettings.from_env(Env({"SEMANTIC_CACHE_DATA_DIR": "/x"}), SHIPPED)
    assert (str(config.data_dir), config.snapshot_s) == ("/x", 60.0)
