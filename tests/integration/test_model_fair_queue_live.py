"""One tenant's flood does not starve another on a real model replica (a process of its own,
the simulator's sleeps at SIM_TIME_SCALE=3: one of B's long prompts takes about 0.6 s to
prefill, its answer seconds to decode).

Tenant B keeps FLOOD long prompts at the replica (all of them there: its in-flight gauge says
so); then tenant A asks three short questions, one after another. The replica's prefill queue
was first come first served: A's first token came after every prompt of B's queued before it
(FLOOD of them; a review measured A's p50 going from 113 ms to 4,422 ms). Now it is
tenant-fair: each of A's questions starts after at most the prefill of B's under way when it
came, and one more if that one ended while A's question was on its way. Asserted on the order
of the first reports (``start``) the client receives, never on a time.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2, model_pb2_grpc
from services.common.auth import internal_metadata
from services.tools.stack.health import SERVING, probe
from tests.integration.extra_processes import loopback, process, service_env
from tests.integration.harness import RunningStack

pytestmark = pytest.mark.integration

FLOOD = 8
A_QUESTIONS = 3
# B's prefills that may start before one of A's: the one under way when A's question came, and
# the next if that one ended while A's question travelled to the replica
AT_MOST_AHEAD = 2


@pytest.fixture(scope="module")
def replica(
    stack: RunningStack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    work: Path = tmp_path_factory.mktemp("fair-queue")
    address, metrics = loopback(), loopback()
    env = service_env(
        stack,
        "model",
        {
            "MODEL_LISTEN": address,
            "MODEL_METRICS_LISTEN": metrics,
            "MODEL_IDS": "sim-small",
            "SIM_TIME_SCALE": "3",
        },
    )
    with process("services.model", env, work / "model.log", lambda: probe(address) == SERVING):
        yield address, metrics


def _generate(tenant: str, text: str, max_tokens: int) -> model_pb2.GenerateRequest:
    question = pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=text)])
    request = pb.CompleteRequest(model="sim-small", max_tokens=max_tokens, messages=[question])
    return model_pb2.GenerateRequest(tenant=tenant, model="sim-small", request=request)


def _long(i: int) -> str:
    return f"document {i}: " + " ".join(f"w{i}x{j} fact {j}" for j in range(400))


def _gauge(metrics: str, name: str, labels: str) -> float:
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    found = re.search(rf"^{name}{{{re.escape(labels)}}} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def _until_in_flight(metrics: str, calls: int) -> None:
    while _gauge(metrics, "cachemesh_model_in_flight", 'model="sim-small"') < calls:
        time.sleep(0.05)


async def _flooded(address: str, metrics: str, token: str) -> list[str]:
    events: list[str] = []
    metadata = internal_metadata(token)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = model_pb2_grpc.ModelStub(channel)

        async def call(tenant: str, name: str, text: str, max_tokens: int) -> None:
            stream = stub.Generate(_generate(tenant, text, max_tokens), metadata=metadata)
            async for chunk in stream:
                if chunk.WhichOneof("part") == "start":
                    events.append(f"{name} start")

        flood = [
            asyncio.ensure_future(call("tenant-b", f"b{i}", _long(i), 200)) for i in range(FLOOD)
        ]
        # every prompt of B's is at the replica (none has ended: its answer decodes for seconds)
        await asyncio.to_thread(_until_in_flight, metrics, FLOOD)
        for n in range(A_QUESTIONS):
            events.append(f"a{n} sent")
            await call("tenant-a", f"a{n}", f"question {n}: say hello", 4)
        await asyncio.gather(*flood)
    return events


def _b_starts_between(events: list[str], first: str, last: str) -> int:
    between = events[events.index(first) + 1 : events.index(last)]
    return sum(e.startswith("b") for e in between)


def test_a_light_tenant_starts_after_one_of_the_floods_prefills_not_all(
    replica: tuple[str, str], stack: RunningStack
) -> None:
    address, metrics = replica
    events = asyncio.run(_flooded(address, metrics, stack.internal_token))
    assert sum(e.startswith("b") for e in events) == FLOOD  # B was served whole too
    waits = [_b_starts_between(events, f"a{n} sent", f"a{n} start") for n in range(A_QUESTIONS)]
    assert all(w <= AT_MOST_AHEAD for w in waits), (waits, events)
    # A's questions were all answered while B still had prompts queued
    assert _b_starts_between(events, f"a{A_QUESTIONS - 1} start", events[-1]) >= 1, events
    waiting = _gauge(metrics, "cachemesh_model_queue_waiting", 'tenant="tenant-b"')
    assert waiting == 0  # every call left the queue
