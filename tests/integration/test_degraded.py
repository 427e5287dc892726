"""Failure paths on a stack of their own: a cancelled stream, dependencies that go down."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import grpc
import pytest

from cachemesh import Client, UnavailableError, build_request
from cachemesh.envfile import read_env_file
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import gateway_pb2_grpc
from services.tools.stack.lifecycle import Stack
from tests.integration.harness import prefix_totals, started_stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def degraded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Client]]:
    run_dir = tmp_path_factory.mktemp("run-degraded")
    # the simulator at its real speed, so a stream can be cancelled while it decodes
    with started_stack(run_dir, {"SIM_TIME_SCALE": "1.0"}) as (runner, _):
        key = read_env_file(run_dir / "demo-keys.env")["CACHEMESH_KEY_A"]
        with Client(runner.router_address, api_key=key, timeout_s=60) as client:
            yield runner, client


def _kill(runner: Stack, *names: str) -> None:
    """Stops the services through the supervisor, which keeps them stopped (held) for the
    rest of this module instead of restarting them."""
    runner.stop_service(*names, timeout_s=30)
    assert not {r.service.name for r in runner.running()} & set(names)


def test_a_cancelled_stream_is_billed_for_what_was_produced_and_never_stored(
    degraded: tuple[Stack, Client],
) -> None:
    runner, client = degraded
    prefix = runner.addresses["prefix-cache"]
    token = runner.keys().internal_token
    before = prefix_totals(prefix, token, "tenant-a")
    request = build_request("Tell me about the history of aviation.", namespace="cancel")
    with grpc.insecure_channel(runner.router_address) as channel:
        call = gateway_pb2_grpc.GatewayStub(channel).StreamComplete(
            request, metadata=(("authorization", f"Bearer {_key(runner)}"),), timeout=60
        )
        chunks = iter(call)
        assert next(chunks).WhichOneof("part") == "start"
        assert next(chunks).WhichOneof("part") == "delta"
        call.cancel()
    after = before
    for _ in range(100):
        after = prefix_totals(prefix, token, "tenant-a")
        if after.requests > before.requests:
            break
        time.sleep(0.1)
    assert after.requests == before.requests + 1  # billed once, for the prompt ...
    produced = after.usage.output_tokens - before.usage.output_tokens
    full = client.complete(build_request("Tell me about the history of aviation.", namespace="x"))
    assert 0 < produced < full.usage.output_tokens  # ... and the tokens streamed so far
    again = client.complete(request)
    assert again.served_by == pb.LAYER_MODEL  # the cancelled answer was never stored


def test_a_retry_after_a_cancelled_call_is_a_new_call_billed_for_itself(
    degraded: tuple[Stack, Client],
) -> None:
    runner, client = degraded
    prefix, token = runner.addresses["prefix-cache"], runner.keys().internal_token
    request = build_request(
        "Describe the airline's baggage policy in detail.",
        namespace="cancel-retry",
        request_id=uuid.uuid4().hex,
    )
    before = prefix_totals(prefix, token, "tenant-a")
    with grpc.insecure_channel(runner.router_address) as channel:
        call = gateway_pb2_grpc.GatewayStub(channel).StreamComplete(
            request, metadata=(("authorization", f"Bearer {_key(runner)}"),), timeout=60
        )
        chunks = iter(call)
        next(chunks), next(chunks)  # start, first delta
        call.cancel()
    retry = client.complete(request)
    assert retry.stop_reason == "end_turn"
    after = prefix_totals(prefix, token, "tenant-a")
    for _ in range(100):  # the cancelled call's bill lands in the background
        if after.requests >= before.requests + 2:
            break
        time.sleep(0.1)
        after = prefix_totals(prefix, token, "tenant-a")
    assert after.requests == before.requests + 2  # the cancelled call and the retry
    billed_output = after.usage.output_tokens - before.usage.output_tokens
    assert billed_output > retry.usage.output_tokens  # the retry's own, plus the partial
    assert retry.usage.output_tokens > 5  # usage describes the retry's own answer
    again = client.complete(request)  # and from now on it is answered once: replayed
    assert again.replayed and not retry.replayed
    again.replayed = False
    assert again == retry


def _key(runner: Stack) -> str:
    return runner.keys().key_for("tenant-a")


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

    _kill(runner, "model")  # sim-small's only replica, and one of sim-large's two
    survivor = client.complete(build_request("How do I reset my password, please?"))
    assert survivor.model == "sim-large"  # the other tier, on its second replica (model-2)
    _kill(runner, "model-2")
    with pytest.raises(UnavailableError, match="no model replica") as info:
        client.complete(build_request("How do I reset my password?"))
    assert "127.0.0.1" not in info.value.message  # internal addresses stay in the logs
