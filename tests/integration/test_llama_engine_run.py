"""A self-hosted replica's engine run (``GenerateStart.engine_instance``) on the real
llama-server: the same for every call to one server process, a new one once that server is
restarted on the same port (its KV cache gone), which is what tells prefix-cache to forget its
view of the replica. The signal is llama-server's per-process random ``media_marker`` of
``/props`` (llama.cpp's get_media_marker(): "each time the server restarts, the marker will
be different"), passed on as a digest, learned off the call path (``engine_run``). The
replica is built as ``serve()`` builds it."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from services.model.providers.api import ProviderApi
from services.tools.engine.cache import engine_paths
from services.tools.engine.servers import UPSTREAM_ID, EngineOptions, LlamaServers
from services.tools.stack.environment import tool_settings
from services.tools.stack.ports import free_port
from tests.integration import harness
from tests.providers.replica import provider_replica, provider_settings

pytestmark = pytest.mark.integration
MODEL = "local-small"  # a self_hosted row


async def _runs_until(
    api: ProviderApi, until: Callable[[str], bool], calls: int = 100
) -> list[str]:
    """Calls to the replica, one after another, until a start's run passes ``until`` (the
    run is refreshed off the call path, at most once a second: a call sends it as known when
    its chat's headers came, so the first calls after a start or a restart may carry none or
    the one before); each start's run."""
    message = pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="Say hi.")])
    request = pb.CompleteRequest(model=MODEL, max_tokens=4, messages=[message])
    call = model_pb2.GenerateRequest(tenant="t", model=MODEL, request=request)
    runs: list[str] = []
    for _ in range(calls):
        starts = [c.start async for c in api.generate(call, 120.0) if c.HasField("start")]
        assert len(starts) == 1, starts
        runs.append(starts[0].engine_instance)
        if until(runs[-1]):
            return runs
        await asyncio.sleep(0.1)
    raise AssertionError(f"no run passed in {calls} calls: {runs}")


async def test_the_engine_run_is_one_per_server_process_and_new_after_a_restart(
    tmp_path: Path,
) -> None:
    paths = engine_paths(tool_settings(harness.ROOT, os.environ))  # as make engine
    assert paths.ready(), f"no llama-server build under {paths.root}: run `make engine` first"
    port = free_port()
    first = LlamaServers(paths, tmp_path / "first", EngineOptions(1, 1, 1024))
    (replica,) = first.start([port])
    # one replica in front of the server throughout, as a model service is across its
    # engine's restart
    settings = provider_settings("openai", replica.base_url, upstream_ids={MODEL: UPSTREAM_ID})
    api = provider_replica(settings, [MODEL])
    try:
        try:
            runs = await _runs_until(api, bool)
            one = runs[-1]
            assert set(runs[:-1]) <= {""}, runs  # none, then the run: no other
            # the same process: the same run on each call (more than a refresh apart)
            await asyncio.sleep(1.5)
            assert await _runs_until(api, bool, calls=1) == [one]
        finally:
            first.stop()
        again = LlamaServers(paths, tmp_path / "again", EngineOptions(1, 1, 1024))
        again.start([port])
        try:
            runs = await _runs_until(api, lambda run: run not in ("", one))
            assert set(runs[:-1]) <= {"", one}, runs
        finally:
            again.stop()
    finally:
        await api.close()
