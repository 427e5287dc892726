"""A caller reading a real engine's long answer slowly (a small HTTP/2 receive window, no BDP
probe, a pause between chunks), for longer than the router's ROUTER_MODEL_TIMEOUT_S (7.5 s
here) while the engine writes the answer well within it: one llama.cpp ``llama-server``
(SmolLM2-135M-Instruct, one thread) behind the model process. The router reads the model's
stream ahead of its caller (``read_ahead``): the caller gets the whole answer, billed by its
end. Before, the router read the model's stream only as the caller took it, the model call's
deadline ran on the caller's pace, and the finished answer was cut as "still running at its
deadline ... ask for a smaller max_tokens" after 249 of its 400 tokens were read."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import grpc
import pytest

from cachemesh.envfile import read_env_file
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import gateway_pb2_grpc
from services.tools.engine.cache import engine_paths
from services.tools.engine.servers import EngineOptions, LlamaServers, local_engine_settings
from services.tools.stack.environment import tool_settings
from services.tools.stack.lifecycle import Stack
from services.tools.stack.otlp_sink import OtlpSink
from services.tools.stack.ports import free_port
from tests.integration import harness

pytestmark = pytest.mark.integration

MODEL_TIMEOUT_S = 7.5
# about 1.5 s of the engine's decode (5x within the timeout; a loaded machine's 22 tokens a
# second: 4.5 s, within it); read at PAUSE_S a chunk: 12 s and more. The margins of 15 s, 200
# tokens, 24 s, halved: the point is the ratio (the read outlasts the timeout, the engine's
# write does not), not the seconds
MAX_TOKENS = 100
PAUSE_S = 0.12
WINDOW = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 256)]
QUESTION = "Write a very long and detailed story about a dragon and a knight. Never stop."


async def _read_slowly(target: str, key: str) -> tuple[str, int, int]:
    request = pb.CompleteRequest(
        model="local-small",
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=QUESTION)])],
        cache=pb.CacheOptions(semantic=pb.SEMANTIC_MODE_BYPASS),
    )
    metadata = (("authorization", f"Bearer {key}"),)
    deltas, tokens = 0, 0
    async with grpc.aio.insecure_channel(target, options=WINDOW) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        try:
            async for chunk in stub.StreamComplete(request, metadata=metadata, timeout=120):
                if chunk.WhichOneof("part") == "delta":
                    deltas += 1
                elif chunk.WhichOneof("part") == "end":
                    tokens = chunk.end.usage.output_tokens
                await asyncio.sleep(PAUSE_S)  # the slow reader
        except grpc.aio.AioRpcError as error:
            return f"{error.code().name}: {error.details()}", deltas, tokens
    return "answered", deltas, tokens


async def test_a_long_answer_read_slower_than_the_model_timeout_is_whole(tmp_path: Path) -> None:
    paths = engine_paths(tool_settings(harness.ROOT, os.environ))  # as make engine
    assert paths.ready(), f"no llama-server build under {paths.root}: run `make engine` first"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    options = EngineOptions(1, 1, 2048)
    engines = LlamaServers(paths, run_dir, options)
    sink = OtlpSink()
    sink.start()
    try:
        replicas = engines.start([free_port()])
        extra = {"OTEL_TRACES_EXPORTER": "none", "ROUTER_MODEL_TIMEOUT_S": str(MODEL_TIMEOUT_S)}
        plain = Stack.on_free_ports(harness.ROOT, run_dir, {**harness.test_settings(sink), **extra})
        stack = plain.with_overrides(local_engine_settings(plain.settings(), replicas, options))
        stack.start(timeout_s=240)
        try:
            key = read_env_file(run_dir / "demo-keys.env")["CACHEMESH_KEY_A"]
            outcome, deltas, tokens = await _read_slowly(stack.router_address, key)
        finally:
            stack.stop()
    finally:
        engines.stop()
        sink.stop()
    print(f"\nread slowly: {outcome}, {deltas} deltas, {tokens} tokens billed")
    assert outcome == "answered"
    assert deltas * PAUSE_S > MODEL_TIMEOUT_S, "the answer was read within the model timeout"
    assert tokens >= deltas  # billed by the answer's end
