"""The stack the mid-answer stall tests run: its two model processes serve ``local-small`` (a
self-hosted row) through the OpenAI adapter, both in front of one loopback OpenAI-compatible
server (``tests.providers``), as ``up --local-engine`` puts them in front of two llama-server
replicas, and the router cuts a call silent mid-answer after ``STALL_S``. ``takes_tools``: the
stack's model table says ``local-small`` takes tools (the packaged row says not: SmolLM2's chat
template has none), for an engine that writes tool calls."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cachemesh import Client
from cachemesh.envfile import read_env_file
from services.tools.engine.servers import (
    LOCAL_MODELS,
    EngineOptions,
    Replica,
    local_engine_settings,
)
from services.tools.stack.lifecycle import Stack
from services.tools.stack.otlp_sink import OtlpSink
from tests.integration import harness
from tests.providers import openai_wire
from tests.providers.wire_server import WireServer

MODEL = LOCAL_MODELS["small"]
STALL_S = 0.5  # ROUTER_MID_ANSWER_STALL_S


@dataclass
class EngineStack:
    client: Client  # tenant a's, one attempt a call
    server: WireServer  # the engine: ``script`` its next reply
    sink: OtlpSink  # the stack's spans


@contextmanager
def engine_stack(run_dir: Path, *, takes_tools: bool = False) -> Iterator[EngineStack]:
    server = WireServer({"openai": openai_wire.default}, {"openai": openai_wire.rejected("")})
    server.start()
    sink = OtlpSink()
    sink.start()
    try:
        options = EngineOptions(2, 1, 4096)
        replicas = [Replica(1, server.port, 0), Replica(2, server.port, 0)]
        plain = Stack.on_free_ports(harness.ROOT, run_dir, harness.test_settings(sink))
        overrides = local_engine_settings(plain.settings(), replicas, options)
        overrides["ROUTER_MID_ANSWER_STALL_S"] = str(STALL_S)
        if takes_tools:
            table = run_dir / "models.toml"
            packaged = (harness.ROOT / "services/common/models.toml").read_text(encoding="utf-8")
            row = f"[models.{MODEL}]\n"
            assert row in packaged and "takes_tools = false\n" in packaged
            head, rest = packaged.split(row, 1)
            mine, after = rest.split("\n[", 1)
            mine = mine.replace("takes_tools = false", "takes_tools = true")
            table.write_text(f"{head}{row}{mine}\n[{after}", encoding="utf-8")
            overrides["CACHEMESH_MODELS_FILE"] = str(table)
        stack = plain.with_overrides(overrides)
        stack.start(timeout_s=240)
        try:
            keys = read_env_file(run_dir / "demo-keys.env")
            with Client(
                stack.router_address, api_key=keys["CACHEMESH_KEY_A"], max_attempts=1
            ) as client:
                yield EngineStack(client, server, sink)
        finally:
            stack.stop()
    finally:
        sink.stop()
        server.stop()
