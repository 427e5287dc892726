"""Single flight on real processes: concurrent identical misses share one model call even
when it outlasts the L1 deadline, and a leader that is cancelled frees its waiters at once.

A stack of its own: the simulator at its real speed (an answer takes about 0.6 s here) and the
router's Lookup deadline at 0.25 s, so the waiters' first lookups end while the leader's model
call is still on; they must look again (``pending``) and be served its answer.
"""

from __future__ import annotations

import itertools
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cachemesh import Client, build_request
from cachemesh.envfile import read_env_file
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import gateway_pb2_grpc
from tests.integration.harness import started_stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, str]]:
    """(address, tenant-a's key) of the router, and where semantic-cache's metrics are read."""
    run_dir = tmp_path_factory.mktemp("run-single-flight")
    overrides = {
        "SIM_TIME_SCALE": "1.0",
        "ROUTER_SEMANTIC_TIMEOUT_S": "0.25",
        "ROUTER_SEMANTIC_LEASE_WAIT_S": "30",
    }
    with started_stack(run_dir, overrides) as (runner, _):
        key = read_env_file(run_dir / "demo-keys.env")["CACHEMESH_KEY_A"]
        yield runner.router_address, key, runner.metrics_addresses["semantic-cache"]


@pytest.fixture(scope="module")
def router(running: tuple[str, str, str]) -> tuple[str, str]:
    """(address, tenant-a's key) of the router."""
    return running[0], running[1]


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


def pending_lookups(metrics_address: str) -> float:
    """L1's Lookups that ended ``pending`` so far (an identical request's call still on)."""
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "cachemesh_semantic_cache_lookups_total"
        and sample.labels.get("result") == "pending"
    )


def test_waiters_on_a_failed_leader_share_one_new_model_call(
    running: tuple[str, str, str],
) -> None:
    """The leader's call is cancelled while four identical requests wait on it in their second
    Lookup: one of them leads the next model call and the three others are served its answer
    (before, each of the three got ``pending`` back and called the model as well)."""
    target, key, metrics = running
    # sim-large answers this in 113 tokens: about 1.6 s at 70 tokens/s
    request = build_request(
        "How do I request a wheelchair at the airport?",
        model="sim-large",
        namespace=uuid.uuid4().hex[:12],
    )
    before = pending_lookups(metrics)
    with (
        grpc.insecure_channel(target) as channel,
        Client(target, api_key=key, timeout_s=60) as client,
        ThreadPoolExecutor(max_workers=4) as pool,
    ):
        leader = gateway_pb2_grpc.GatewayStub(channel).StreamComplete(
            request, metadata=(("authorization", f"Bearer {key}"),), timeout=60
        )
        assert next(iter(leader)).WhichOneof("part") == "start"  # it holds the lease
        waiters = [pool.submit(client.complete, request) for _ in range(4)]
        # their first Lookups (0.25 s) end pending: each waits in a second one now
        give_up = time.monotonic() + 10
        while pending_lookups(metrics) - before < 4:
            assert time.monotonic() < give_up, "the waiters never got pending"
            time.sleep(0.02)
        time.sleep(0.1)  # for the last router to send its second Lookup (not a TTL)
        leader.cancel()  # its model call ends without a Store: the router releases the lease
        responses = [waiter.result() for waiter in waiters]
    layers = [r.served_by for r in responses]
    assert layers.count(pb.LAYER_SEMANTIC_CACHE) == 3, layers  # one model call, not three
    assert len({"".join(b.text for b in r.content) for r in responses}) == 1


def test_identical_requests_whose_answer_is_never_stored_call_the_model_side_by_side(
    slow_model: Client,
) -> None:
    """Eight identical requests sent at once, each answer cut at ``max_tokens`` (every answer
    of sim-large is longer than 19 tokens), so none is ever stored: the leader's Store marks
    the key uncacheable and wakes the seven waiters, which call the model side by side. Before,
    one of them led and the others waited on it in turn: the calls ran one after another
    (0.28, 0.52, ... 2.02 s), the peak of calls in flight at once 1.

    Each call in flight is counted from its stream's first delta (the model is decoding it)
    to its end, in the order the events reach this process: no time is measured."""
    request = build_request(
        "What is the baggage allowance on a long-haul flight?",
        model="sim-large",
        max_tokens=19,
        temperature=0.0,
        namespace=uuid.uuid4().hex[:12],
    )
    order = itertools.count()
    events: list[tuple[int, int]] = []  # (order, +1 a call's first delta, -1 its end)
    lock = threading.Lock()

    def note(change: int) -> None:
        with lock:
            events.append((next(order), change))

    def call(_: int) -> pb.CompleteResponse:
        end: pb.CompleteResponse | None = None
        decoding = False
        with slow_model.stream(request) as chunks:
            for chunk in chunks:
                part = chunk.WhichOneof("part")
                if part == "delta" and not decoding:
                    decoding = True
                    note(+1)
                elif part == "end":
                    note(-1)
                    end = chunk.end
        assert end is not None and decoding
        return end

    with ThreadPoolExecutor(max_workers=8) as pool:
        ends = list(pool.map(call, range(8)))
    assert all(end.served_by != pb.LAYER_SEMANTIC_CACHE for end in ends)
    assert all(end.stop_reason == "max_tokens" for end in ends), [e.stop_reason for e in ends]
    in_flight = list(itertools.accumulate(change for _, change in sorted(events)))
    # the leader alone, then the seven it woke at once: 7 here (before: 1, one call after
    # another); one thread late to start on a busy machine may miss the others
    assert max(in_flight) >= 6, in_flight
