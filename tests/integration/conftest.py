"""One real stack for the integration tests: five processes on free loopback ports.

It is started by the same runner as ``make up`` (``services.stack``), in a temporary run dir
with its own keys, the simulator's sleeps scaled down, and traces exported over OTLP/gRPC to
a receiver in this test process.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cachemesh import Client
from services.stack.envfile import read_env_file
from services.stack.runner import Stack
from tests.integration.harness import RunningStack, free_port, stack_overrides
from tests.integration.otlp_sink import OtlpSink

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    sink = OtlpSink()
    sink.start()
    run_dir = tmp_path_factory.mktemp("run")
    names = ("router", "semantic-cache", "prefix-cache", "model", "model-2")
    ports = {name: free_port() for name in names}
    runner = Stack(ROOT, run_dir, stack_overrides(ports, sink))
    runner.start(timeout_s=240)
    try:
        demo = read_env_file(run_dir / "demo-keys.env")
        yield RunningStack(
            target=f"127.0.0.1:{ports['router']}",
            addresses={name: f"127.0.0.1:{port}" for name, port in ports.items()},
            keys={"tenant-a": demo["CACHEMESH_KEY_A"], "tenant-b": demo["CACHEMESH_KEY_B"]},
            internal_token=(run_dir / "internal-token").read_text().strip(),
            sink=sink,
            stack=runner,
        )
    finally:
        runner.stop()
        sink.stop()


@pytest.fixture
def client_a(stack: RunningStack) -> Iterator[Client]:
    with Client(stack.target, api_key=stack.keys["tenant-a"]) as client:
        yield client


@pytest.fixture
def client_b(stack: RunningStack) -> Iterator[Client]:
    with Client(stack.target, api_key=stack.keys["tenant-b"]) as client:
        yield client
