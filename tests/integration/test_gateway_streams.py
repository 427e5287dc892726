"""The Gateway's concurrent-stream limit on a real router (ROUTER_MAX_CONCURRENT_STREAMS=2).

One client connection could open any number of concurrent streams. Now the router advertises
its limit in HTTP/2's SETTINGS_MAX_CONCURRENT_STREAMS: on one channel, with two streaming calls
held open, a third is not started by the client's gRPC until one of the two ends.

The two held calls ask for sim-small, served by a replica of this test's own whose simulated
engine is slowed 1000 times (their first token is minutes away); the third asks for sim-large,
served by the session stack's replicas, and answers within a second once started.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

import cachemesh
from cachemesh import build_request
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import gateway_pb2_grpc
from services.tools.stack.health import SERVING, probe
from tests.integration.extra_processes import loopback, process, service_env
from tests.integration.harness import RunningStack

pytestmark = pytest.mark.integration

STREAM_LIMIT = 2
# The chance given to the third call to answer while the first two are held: not a bound
# asserted on (the assertion is on the order of events), only what a limit that did not hold
# would need to show itself (a sim-large answer from the stack takes well under a second).
SHOWN_WITHIN_S = 5.0


@pytest.fixture(scope="module")
def router(stack: RunningStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    work: Path = tmp_path_factory.mktemp("gateway-streams")
    slow = loopback()
    model_env = service_env(
        stack, "model", {"MODEL_LISTEN": slow, "MODEL_IDS": "sim-small", "SIM_TIME_SCALE": "1000"}
    )
    with process("services.model", model_env, work / "model.log", lambda: probe(slow) == SERVING):
        address = loopback()
        env = service_env(
            stack,
            "router",
            {
                "ROUTER_LISTEN": address,
                "MODEL_REPLICAS": f"sim-small={slow},sim-large={stack.addresses['model']}",
                "ROUTER_MAX_CONCURRENT_STREAMS": str(STREAM_LIMIT),
                "ROUTER_MID_ANSWER_STALL_S": "0",  # the held calls are never cut for silence
            },
        )
        log = work / "router.log"
        with process("services.router", env, log, lambda: probe(address) == SERVING):
            yield address


def _request(model: str) -> pb.CompleteRequest:
    # a question of its own: no L1 hit, no identical call in flight to wait for
    return build_request(f"streams {uuid.uuid4().hex}: say something", model=model, max_tokens=16)


async def _third_waits_for_a_slot(address: str, key: str) -> list[str]:
    events: list[str] = []
    metadata = (("authorization", f"Bearer {key}"),)
    options = cachemesh.channel_options(max_attempts=1)
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        # one call answered first: the server's SETTINGS (its stream limit) reach the client
        # before the streams below open; on a new connection a client that has not read them
        # yet opens all three (HTTP/2's initial limit is none), as a loaded machine showed
        await stub.Complete(_request("sim-large"), metadata=metadata, timeout=60)
        held = [
            stub.StreamComplete(_request("sim-small"), metadata=metadata, timeout=120)
            for _ in range(STREAM_LIMIT)
        ]
        third = stub.StreamComplete(_request("sim-large"), metadata=metadata, timeout=120)

        async def first_chunk() -> None:
            chunk = await third.read()
            assert isinstance(chunk, pb.CompleteChunk), chunk
            events.append("third answered")

        answered = asyncio.ensure_future(first_chunk())
        await asyncio.wait({answered}, timeout=SHOWN_WITHIN_S)
        assert not any(call.done() for call in held), "a held call ended on its own"
        events.append("first held call cancelled")
        held[0].cancel()
        await asyncio.wait_for(answered, timeout=60)
        assert not held[1].done()  # the third took the freed slot, beside the second
        held[1].cancel()
    return events


def test_a_third_stream_on_one_connection_starts_only_once_one_of_two_ends(
    router: str, stack: RunningStack
) -> None:
    events = asyncio.run(_third_waits_for_a_slot(router, stack.keys["tenant-a"]))
    assert events == ["first held call cancelled", "third answered"]
