"""Single flight holds for as long as the leading model call runs, not just the lease's age
limit: the router renews its lease while the call is on.

A stack of its own whose lease ages out in 1 s (SEMANTIC_CACHE_LEASE_S) and whose simulator
answers in about 3 s: two identical concurrent requests make one model call. Without the
renewal the waiter was woken at the lease's age limit, led, and called the model as well.
"""

from __future__ import annotations

import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cachemesh import Client, build_request
from cachemesh.envfile import read_env_file
from cachemesh.v1 import gateway_pb2 as pb
from tests.integration.harness import started_stack

pytestmark = pytest.mark.integration

MODEL_PROCESSES = ("model", "model-2")


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, list[str]]]:
    """The router's address, tenant-a's key, and where the model processes' metrics are."""
    run_dir = tmp_path_factory.mktemp("run-lease-renewal")
    overrides = {
        # sim-large answers the question below in 113 tokens: about 3.2 s at this scale
        "SIM_TIME_SCALE": "2.0",
        "SEMANTIC_CACHE_LEASE_S": "1",
        "ROUTER_SEMANTIC_LEASE_WAIT_S": "30",
    }
    with started_stack(run_dir, overrides) as (runner, _):
        key = read_env_file(run_dir / "demo-keys.env")["CACHEMESH_KEY_A"]
        metrics = [runner.metrics_addresses[name] for name in MODEL_PROCESSES]
        yield runner.router_address, key, metrics


def model_calls(metrics_addresses: list[str]) -> float:
    """Generate calls the model processes have ended so far, whatever their outcome."""
    total = 0.0
    for address in metrics_addresses:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        total += sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "cachemesh_model_generations_total"
        )
    return total


def test_identical_requests_share_a_model_call_longer_than_the_lease(
    running: tuple[str, str, list[str]],
) -> None:
    target, key, metrics = running
    namespace = uuid.uuid4().hex[:12]
    request = build_request(
        "How do I request a wheelchair at the airport?", model="sim-large", namespace=namespace
    )
    with Client(target, api_key=key, timeout_s=60) as client:
        # one request first, so no first-use warm-up (of ONNX, of channels) comes in between
        warm = client.complete(build_request("Is there Wi-Fi on board?", namespace=namespace))
        assert warm.served_by != pb.LAYER_SEMANTIC_CACHE
        before = model_calls(metrics)
        with ThreadPoolExecutor(max_workers=2) as pool:
            responses = list(pool.map(client.complete, [request] * 2))
    layers = [r.served_by for r in responses]
    assert model_calls(metrics) - before == 1, layers  # one model call, not two
    assert layers.count(pb.LAYER_SEMANTIC_CACHE) == 1, layers
    assert len({"".join(b.text for b in r.content) for r in responses}) == 1
    called = next(r for r in responses if r.served_by != pb.LAYER_SEMANTIC_CACHE)
    assert called.stop_reason == "end_turn"
    # its decode outlasted the lease's 1 s age limit several times over
    assert called.usage.output_tokens > 100
