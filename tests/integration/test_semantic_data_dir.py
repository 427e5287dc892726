"""A second semantic-cache given the data directory of a running one (a rolling deploy that
starts the new container before the old has stopped, two shards on one volume) stops at
start-up with one line naming SEMANTIC_CACHE_DATA_DIR and the holder, touching nothing there;
the running one keeps serving what it acknowledged, and stores on."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from cachemesh.v1 import semantic_cache_pb2 as sc
from cachemesh.v1 import semantic_cache_pb2_grpc as sc_grpc
from services.tools.stack.ports import free_port
from tests.integration.test_semantic_crash import AUTH, ROOT, TOKEN, answer, request, serving, start
from tests.processes import stop_process

pytestmark = pytest.mark.integration


async def test_a_second_process_on_a_data_directory_in_use_stops_at_start_up(
    tmp_path: Path,
) -> None:
    data_dir, port = tmp_path / "data", free_port()
    first = start(data_dir, port)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await serving(channel, first)
            stub = sc_grpc.SemanticCacheStub(channel)
            stored = await stub.Store(
                sc.StoreRequest(tenant="t", request=request(1), answer=answer(1)), metadata=AUTH
            )
            assert stored.stored
            env = {
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "SEMANTIC_CACHE_LISTEN": f"127.0.0.1:{free_port()}",
                "SEMANTIC_CACHE_METRICS_LISTEN": "127.0.0.1:0",
                "CACHEMESH_INTERNAL_TOKEN": TOKEN,
                "OTEL_TRACES_EXPORTER": "none",
                "SEMANTIC_CACHE_DATA_DIR": str(data_dir),
            }
            second = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "services.semantic_cache"],
                cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            assert second.returncode == 2, second.stderr
            assert (
                f"semantic-cache: configuration error: SEMANTIC_CACHE_DATA_DIR={data_dir}: "
                "another semantic-cache process is using the directory "
                f"(pid {first.pid} on {socket.gethostname()} holds its .lock)"
            ) in second.stderr, second.stderr
            assert "Traceback" not in second.stderr
            hit = await stub.Lookup(sc.LookupRequest(tenant="t", request=request(1)), metadata=AUTH)
            assert hit.hit and hit.match.entry_id == stored.entry_id
            more = sc.StoreRequest(tenant="t", request=request(2), answer=answer(2))
            assert (await stub.Store(more, metadata=AUTH)).stored
    finally:
        stop_process(first, 60)
    assert first.returncode == 0
