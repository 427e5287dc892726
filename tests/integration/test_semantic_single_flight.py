"""Concurrent identical misses share one model call even when it outlasts the L1 deadline.

A stack of its own: the simulator at its real speed (an answer takes about 0.6 s here) and the
router's Lookup deadline at 0.25 s, so the waiters' first lookups end while the leader's model
call is still on; they must look again (``pending``) and be served its answer.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cachemesh import Client, build_request
from cachemesh.v1 import gateway_pb2 as pb
from services.stack.envfile import read_env_file
from services.stack.runner import Stack
from tests.integration.harness import free_port, stack_overrides
from tests.integration.otlp_sink import OtlpSink

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    sink = OtlpSink()
    sink.start()
    run_dir = tmp_path_factory.mktemp("run-single-flight")
    names = ("router", "semantic-cache", "prefix-cache", "model", "model-2")
    ports = {name: free_port() for name in names}
    overrides = {
        **stack_overrides(ports, sink),
        "SIM_TIME_SCALE": "1.0",
        "ROUTER_SEMANTIC_TIMEOUT_S": "0.25",
        "ROUTER_SEMANTIC_LEASE_WAIT_S": "30",
    }
    runner = Stack(ROOT, run_dir, overrides)
    runner.start(timeout_s=240)
    key = read_env_file(run_dir / "demo-keys.env")["CACHEMESH_KEY_A"]
    try:
        with Client(f"127.0.0.1:{ports['router']}", api_key=key, timeout_s=60) as client:
            yield client
    finally:
        runner.stop()
        sink.stop()


def test_identical_misses_share_a_model_call_longer_than_the_lookup_deadline(
    slow_model: Client,
) -> None:
    namespace = uuid.uuid4().hex[:12]
    # one request first, so no first-use warm-up (of ONNX, of channels) eats a 0.25 s deadline
    warm = slow_model.complete(build_request("Is there Wi-Fi on board?", namespace=namespace))
    assert warm.served_by != pb.LAYER_SEMANTIC_CACHE
    request = build_request(
        "Which documents do I need to fly to Canada with a child?", namespace=namespace
    )
    with ThreadPoolExecutor(max_workers=4) as pool:
        responses = list(pool.map(slow_model.complete, [request] * 4))
    layers = [r.served_by for r in responses]
    assert layers.count(pb.LAYER_SEMANTIC_CACHE) == 3, layers  # one model call, shared
    assert len({"".join(b.text for b in r.content) for r in responses}) == 1
    called = [r for r in responses if r.served_by != pb.LAYER_SEMANTIC_CACHE]
    assert called[0].stop_reason == "end_turn"  # a whole answer (a truncated one is not stored)
    assert called[0].usage.output_tokens > 50  # decoding it at real speed outlasts 0.25 s
