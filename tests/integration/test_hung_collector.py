"""A trace collector that takes connections and never answers stops no service past its grace.

The SDK's tracing shutdown waits 30 s for its export thread (each export up to
OTEL_EXPORTER_OTLP_TIMEOUT) and ran on the event loop of every service, semantic-cache's
before its last snapshot: ``make down`` took 17.6 s instead of 2.6, the router 11.6 s from
draining to stopped, and under compose's stop_grace_period a process was SIGKILLed (its
last steps, the snapshot among them, never ran). The tracing stop is now the last step of
each, bounded (``TRACING_STOP_S``): every process ends its stop within the supervisor's
grace, semantic-cache having saved its snapshot before it gave up on the collector.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachemesh import Client, build_request
from cachemesh.envfile import read_env_file
from cachemesh.v1 import gateway_pb2 as pb
from tests.black_hole import BlackHole
from tests.integration.harness import started_stack

pytestmark = pytest.mark.integration

GAVE_UP = "the collector did not take the last spans"
NAMES = {  # log file -> the name its process stops with
    "router": "router",
    "http-front": "http-front",
    "semantic-cache": "semantic-cache",
    "prefix-cache": "prefix-cache",
    "model": "model",
    "model-2": "model",
}


@pytest.fixture
def hole() -> Iterator[BlackHole]:
    black_hole = BlackHole()
    yield black_hole
    black_hole.close()


def _messages(log: Path) -> list[str]:
    messages = []
    for line in log.read_text().splitlines():
        try:
            messages.append(str(json.loads(line).get("msg", "")))
        except json.JSONDecodeError:
            messages.append(line)  # the supervisor's, and what a process wrote before logging
    return messages


def test_a_hung_collector_stops_every_service_within_its_grace_snapshot_first(
    tmp_path: Path, hole: BlackHole
) -> None:
    run_dir = tmp_path / "run"
    extra = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": hole.endpoint,
        # each export alone would wait ten minutes: only the stop's own bound ends the wait
        "OTEL_EXPORTER_OTLP_TIMEOUT": "600",
        "SEMANTIC_CACHE_SNAPSHOT_S": "0",  # the one save is the stop's
    }
    with started_stack(run_dir, extra) as (stack, _sink):
        keys = read_env_file(run_dir / "demo-keys.env")
        client = Client(stack.router_address, api_key=keys["CACHEMESH_KEY_A"], timeout_s=60)
        answered = client.complete(build_request("What is a hung trace collector?"))
        assert answered.served_by != pb.LAYER_SEMANTIC_CACHE  # a model call, stored in L1
        assert hole.accepted.wait(30)  # the services' spans are going to the collector
    # started_stack stopped the stack: SIGKILL for any process still running after the grace
    logs = run_dir / "logs"
    supervisor = "\n".join(_messages(logs / "supervisor.log"))
    assert "SIGKILL" not in supervisor, supervisor
    for log_name, name in NAMES.items():
        messages = _messages(logs / f"{log_name}.log")
        assert f"{name} stopped" in messages, (log_name, messages[-5:])
    messages = _messages(logs / "semantic-cache.log")
    saved = [i for i, m in enumerate(messages) if m.startswith("saved 1 entries")]
    gave_up = [i for i, m in enumerate(messages) if GAVE_UP in m]
    assert saved and gave_up and saved[-1] < gave_up[-1], messages[-8:]
