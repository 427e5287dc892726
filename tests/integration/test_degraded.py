"""A dependency that is down degrades the request, never loses it (its own stack)."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachemesh import Client, UnavailableError, build_request
from cachemesh.v1 import gateway_pb2 as pb
from services.stack.envfile import read_env_file
from services.stack.runner import Stack
from tests.integration.harness import free_port, stack_overrides
from tests.integration.otlp_sink import OtlpSink

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def degraded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Client]]:
    sink = OtlpSink()
    sink.start()
    run_dir = tmp_path_factory.mktemp("run-degraded")
    ports = {name: free_port() for name in ("router", "semantic-cache", "prefix-cache", "model")}
    runner = Stack(ROOT, run_dir, stack_overrides(ports, sink))
    runner.start(timeout_s=240)
    key = read_env_file(run_dir / "demo-keys.env")["CACHEMESH_KEY_A"]
    try:
        with Client(f"127.0.0.1:{ports['router']}", api_key=key, timeout_s=60) as client:
            yield runner, client
    finally:
        runner.stop()
        sink.stop()


def _kill(runner: Stack, *names: str) -> None:
    victims = [r for r in runner.running() if r.service.name in names]
    assert len(victims) == len(names)
    for victim in victims:
        victim.signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while any(v.exit_code() is None for v in victims) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(v.exit_code() is not None for v in victims)


def test_without_the_caches_the_model_answers_with_an_estimated_cost(
    degraded: tuple[Stack, Client],
) -> None:
    runner, client = degraded
    _kill(runner, "semantic-cache", "prefix-cache")
    response = client.complete(build_request("How do I reset my password?"))
    assert response.served_by == pb.LAYER_MODEL
    assert response.cost.estimated
    assert response.usage.output_tokens > 0 and response.content[0].text
    assert response.usage.input_tokens > 0 and response.cost.cost_nanos > 0
    again = client.complete(build_request("How do I reset my password?"))
    assert again.served_by == pb.LAYER_MODEL  # nothing to serve it from: still answered

    _kill(runner, "model")
    with pytest.raises(UnavailableError, match="no model replica"):
        client.complete(build_request("How do I reset my password?"))
