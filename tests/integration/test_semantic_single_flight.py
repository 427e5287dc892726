"""Single flight on real processes: concurrent identical misses share one model call even
when it outlasts the L1 deadline, and a leader that is cancelled frees its waiters at once.

A stack of its own: the simulator at its real speed (an answer takes about 0.6 s here) and the
router's Lookup deadline at 0.25 s, so the waiters' first lookups end while the leader's model
call is still on; they must look again (``pending``) and be served its answer.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from cachemesh import Client, build_request
from cachemesh.envfile import read_env_file
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import gateway_pb2_grpc
from tests.integration.harness import started_stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(address, tenant-a's key) of the router."""
    run_dir = tmp_path_factory.mktemp("run-single-flight")
    overrides = {
        "SIM_TIME_SCALE": "1.0",
        "ROUTER_SEMANTIC_TIMEOUT_S": "0.25",
        "ROUTER_SEMANTIC_LEASE_WAIT_S": "30",
    }
    with started_stack(run_dir, overrides) as (runner, _):
        key = read_env_file(run_dir / "demo-keys.env")["CACHEMESH_KEY_A"]
        yield runner.router_address, key


@pytest.fixture
def slow_model(router: tuple[str, str]) -> Iterator[Client]:
    with Client(router[0], api_key=router[1], timeout_s=60) as client:
        yield client


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


def test_a_cancelled_leader_frees_its_waiters_at_once(router: tuple[str, str]) -> None:
    """The leader's stream is cancelled before its Store: the router releases the lease, so
    the identical request after it is answered by the model within a deadline shorter than
    the lease's 30 s age limit (without the release it would wait that out and time out)."""
    target, key = router
    request = build_request(
        "What is the cheapest way to change a flight?", namespace=uuid.uuid4().hex[:12]
    )
    with grpc.insecure_channel(target) as channel:
        call = gateway_pb2_grpc.GatewayStub(channel).StreamComplete(
            request, metadata=(("authorization", f"Bearer {key}"),), timeout=60
        )
        chunks = iter(call)
        assert next(chunks).WhichOneof("part") == "start"
        assert next(chunks).WhichOneof("part") == "delta"
        call.cancel()  # the leader, mid-answer: no Store will end its lease
    with Client(target, api_key=key, timeout_s=10) as client:
        again = client.complete(request)
    assert again.served_by != pb.LAYER_SEMANTIC_CACHE and again.stop_reason == "end_turn"
