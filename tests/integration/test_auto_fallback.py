"""``auto`` with one tier's model unreachable, on real processes (sim-large's replica an address
nothing listens on): the tier that answers in its place is named in the response's
``routing.reason`` and on the request's span; a request that accepts only the large tier's
answer gets none of the small tier's."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import grpc
import pytest

from cachemesh import CachemeshError, Client, build_request
from cachemesh.envfile import read_env_file
from cachemesh.v1 import gateway_pb2 as pb
from services.tools.stack.lifecycle import Stack
from services.tools.stack.otlp_sink import OtlpSink
from tests.integration.harness import router_spans, started_stack

pytestmark = pytest.mark.integration

NOTHING_THERE = "127.0.0.1:9"  # discard: nothing listens on loopback


@pytest.fixture(scope="module")
def large_down(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Stack, OtlpSink, Client]]:
    run_dir = tmp_path_factory.mktemp("run-auto-fallback")
    replicas = f"sim-small=127.0.0.1:50054,sim-large={NOTHING_THERE}"
    environ = {**os.environ, "MODEL_REPLICAS": replicas}
    with started_stack(run_dir, environ=environ) as (runner, sink):
        key = read_env_file(run_dir / "demo-keys.env")["CACHEMESH_KEY_A"]
        with Client(runner.router_address, api_key=key, max_attempts=1, timeout_s=30) as client:
            yield runner, sink, client


def _auto(question: str, threshold: float | None = None, namespace: str = "") -> pb.CompleteRequest:
    request = build_request(question, max_tokens=32, namespace=namespace)
    if threshold is not None:
        request.routing.threshold = threshold
    return request


def test_a_fallback_to_the_small_tier_says_so_in_the_routing_reason(
    large_down: tuple[Stack, OtlpSink, Client],
) -> None:
    _, sink, client = large_down
    tag = uuid.uuid4().hex[:8]
    # every score but the lowest reaches the large tier at this threshold
    answer = client.complete(_auto(f"{tag} Prove that there are infinitely many primes", -0.99))
    assert (answer.tier, answer.model) == ("small", "sim-small")
    assert "the request's threshold -0.990" in answer.routing.reason
    assert "fallback: sim-large unavailable" in answer.routing.reason  # said only the threshold
    root, _chat = router_spans(sink, answer.trace_id)
    attributes = root.attributes
    assert attributes["cachemesh.routing.reason"] == answer.routing.reason
    assert attributes["cachemesh.tier_reason"] == "fallback: sim-large unavailable"


def test_a_request_for_the_large_model_alone_is_not_answered_by_the_small_one(
    large_down: tuple[Stack, OtlpSink, Client],
) -> None:
    """``routing.threshold`` -1 ("this time the large model"): L1 refuses a small-tier answer
    for it, and so does the model call. It was answered by sim-small (billed as a saving) and
    that answer stored under ``auto``, served to the next default-threshold request as a hit."""
    _, _, client = large_down
    tag = uuid.uuid4().hex[:8]
    question = f"{tag} Prove that there are infinitely many primes"
    with pytest.raises(CachemeshError) as caught:
        client.complete(_auto(question, -1.0, namespace=tag))
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert "sim-large" in str(caught.value) and "only the large tier" in str(caught.value)
    # nothing of the small tier's was stored (the namespace: none of another test's answers)
    again = client.complete(_auto(question, namespace=tag))
    assert again.served_by == pb.LAYER_MODEL
