"""A self-hosted replica's engine run (``GenerateStart.engine_instance``) on the real
llama-server: the same for every call to one server process, a new one once that server is
restarted on the same port (its KV cache gone), which is what tells prefix-cache to forget its
view of the replica. The signal is llama-server's per-process random ``media_marker`` of
``/props`` (llama.cpp's get_media_marker(): "each time the server restarts, the marker will
be different"), passed on as a digest. The replica is built as ``serve()`` builds it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from services.tools.engine.cache import engine_paths
from services.tools.engine.servers import UPSTREAM_ID, EngineOptions, LlamaServers
from services.tools.stack.environment import tool_settings
from services.tools.stack.ports import free_port
from tests.integration import harness
from tests.providers.replica import provider_replica, provider_settings

pytestmark = pytest.mark.integration
MODEL = "local-small"  # a self_hosted row


async def _start(base_url: str) -> model_pb2.GenerateStart:
    """One call to the replica in front of the server at ``base_url``: its start."""
    settings = provider_settings("openai", base_url, upstream_ids={MODEL: UPSTREAM_ID})
    api = provider_replica(settings, [MODEL])
    message = pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="Say hi.")])
    request = pb.CompleteRequest(model=MODEL, max_tokens=4, messages=[message])
    call = model_pb2.GenerateRequest(tenant="t", model=MODEL, request=request)
    try:
        starts = [c.start async for c in api.generate(call, 120.0) if c.HasField("start")]
    finally:
        await api.close()
    assert len(starts) == 1, starts
    return starts[0]


async def test_the_engine_run_is_one_per_server_process_and_new_after_a_restart(
    tmp_path: Path,
) -> None:
    paths = engine_paths(tool_settings(harness.ROOT, os.environ))  # as make engine
    assert paths.ready(), f"no llama-server build under {paths.root}: run `make engine` first"
    port = free_port()
    first = LlamaServers(paths, tmp_path / "first", EngineOptions(1, 1, 1024))
    (replica,) = first.start([port])
    try:
        one = await _start(replica.base_url)
        two = await _start(replica.base_url)  # a new connection, the same process
    finally:
        first.stop()
    assert one.engine_instance, one
    assert two.engine_instance == one.engine_instance
    again = LlamaServers(paths, tmp_path / "again", EngineOptions(1, 1, 1024))
    (restarted,) = again.start([port])
    try:
        three = await _start(restarted.base_url)
    finally:
        again.stop()
    assert three.engine_instance and three.engine_instance != one.engine_instance, (one, three)
