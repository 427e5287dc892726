"""Overload on a real semantic-cache process: the embedding queue works only for callers who
still wait, stays bounded, and a full queue answers at once.

A burst of Lookups with 0.3 s deadlines (a router under a storm) used to leave the process
embedding for callers long gone (278-661 texts of 800) while every later Lookup waited behind
them for seconds, past the router's L1 deadline. Now a Lookup's text leaves the queue when its
time is up, so what is embedded is about what was answered; and beyond
SEMANTIC_CACHE_EMBED_MAX_QUEUE a Lookup skips L1 at once ("busy"), never an error: the router
sends the request on to the model. Counts are read from the process's metrics; nothing is timed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import semantic_cache_pb2 as sc
from cachemesh.v1 import semantic_cache_pb2_grpc as sc_grpc
from services.common.auth import internal_metadata
from services.tools.stack.ports import free_port
from tests.integration.test_semantic_crash import serving

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "overload-test-internal-token-0123456789"
AUTH = internal_metadata(TOKEN)
MAX_BATCH = 8
MAX_QUEUE = 16
PENDING_CALLS = 1000  # gRPC core's grpc.server.max_pending_requests, by default
WAVE = PENDING_CALLS // 4  # a burst's Lookups sent at once
EMBEDDED = "cachemesh_semantic_cache_embed_batch_size_sum"  # texts embedded so far


@dataclass(frozen=True)
class Process:
    child: subprocess.Popen[bytes]
    port: int
    metrics_port: int


@pytest.fixture(scope="module")
def process() -> Iterator[Process]:
    """A semantic-cache with small batches and a small queue."""
    with started(MAX_BATCH, MAX_QUEUE) as running:
        yield running


@contextlib.contextmanager
def started(max_batch: int, max_queue: int) -> Iterator[Process]:
    port, metrics_port = free_port(), free_port()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "SEMANTIC_CACHE_LISTEN": f"127.0.0.1:{port}",
        "SEMANTIC_CACHE_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
        "CACHEMESH_INTERNAL_TOKEN": TOKEN,
        "OTEL_TRACES_EXPORTER": "none",
        "CACHEMESH_GRACE_S": "0",
        "SEMANTIC_CACHE_EMBED_MAX_BATCH": str(max_batch),
        "SEMANTIC_CACHE_EMBED_MAX_QUEUE": str(max_queue),
        "SEMANTIC_CACHE_EMBED_MAX_QUEUE_PER_TENANT": str(max_queue),
    }
    child = subprocess.Popen(
        [sys.executable, "-m", "services.semantic_cache"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield Process(child, port, metrics_port)
    finally:
        child.kill()
        child.wait(timeout=30)


def request(text: str) -> pb.CompleteRequest:
    return pb.CompleteRequest(
        model="sim-small",
        max_tokens=100,
        system=[pb.ContentBlock(text="You are a support bot.")],
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=text)])],
    )


def question(i: int) -> str:
    return f"What is the refund policy for order {i}? " + " ".join(
        f"word{(i * 7 + k) % 97}" for k in range(i % 13)
    )


def metric(metrics_port: int, name: str) -> float:
    """A counter's, gauge's or histogram sum's value (0 when the process has none)."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    body = urllib.request.urlopen(url, timeout=10).read().decode()
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return 0.0


async def ready(
    process: Process, tenants: tuple[str, ...] = ("a",)
) -> tuple[grpc.aio.Channel, sc_grpc.SemanticCacheAsyncStub]:
    """A channel to the process once it serves, its stub, and the tenants' scope of the
    Lookups held (an entry in it: a Lookup of another question is embedded and searched)."""
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{process.port}")
    await serving(channel, process.child)
    stub = sc_grpc.SemanticCacheStub(channel)
    for tenant in tenants:
        seed = sc.StoreRequest(
            tenant=tenant,
            request=request("seed question about billing"),
            answer=sc.CachedAnswer(
                content=[pb.ContentBlock(text="seed")],
                model="sim-small",
                stop_reason="end_turn",
                output_tokens=6,
            ),
        )
        assert (await stub.Store(seed, metadata=AUTH, timeout=30)).stored
    return channel, stub


async def test_a_burst_of_short_deadlines_embeds_only_for_callers_still_waiting(
    process: Process,
) -> None:
    metrics_port = process.metrics_port
    channel, stub = await ready(process)
    async with channel:
        embedded_before = metric(metrics_port, "cachemesh_semantic_cache_embed_batch_size_sum")
        answered = 0

        async def one(i: int) -> None:
            nonlocal answered
            try:
                await stub.Lookup(
                    sc.LookupRequest(tenant="a", request=request(question(i))),
                    metadata=AUTH,
                    timeout=0.3,
                )
                answered += 1
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED, exc

        burst = 300
        await asyncio.gather(*(one(i) for i in range(burst)))
        # a Lookup after the burst: before, it waited for every text of the burst
        fresh = sc.LookupRequest(tenant="a", request=request("a brand new question right after"))
        await stub.Lookup(fresh, metadata=AUTH, timeout=120)
        embedded = (
            metric(metrics_port, "cachemesh_semantic_cache_embed_batch_size_sum") - embedded_before
        )
        # each answered Lookup embedded at most its text; at most the batches running as the
        # burst's deadlines passed embedded for callers gone (before: the whole burst)
        assert embedded <= answered + 1 + 4 * MAX_BATCH, (embedded, answered)
        shed = metric(metrics_port, "cachemesh_semantic_cache_embed_shed_total")
        dropped = metric(metrics_port, "cachemesh_semantic_cache_embed_dropped_total")
        assert shed + dropped > 0
        assert metric(metrics_port, "cachemesh_semantic_cache_embed_queue") == 0


async def test_a_full_queue_answers_busy_at_once_never_an_error(
    process: Process,
) -> None:
    metrics_port = process.metrics_port
    channel, stub = await ready(process)
    async with channel:
        shed_before = metric(metrics_port, "cachemesh_semantic_cache_embed_shed_total")
        lookups = [
            stub.Lookup(
                sc.LookupRequest(tenant="a", request=request(question(1000 + i))),
                metadata=AUTH,
                timeout=120,
            )
            for i in range(10 * MAX_QUEUE)
        ]
        replies = await asyncio.gather(*lookups)  # every one answered: none fails
        busy = [r for r in replies if r.skip_reason.startswith("semantic-cache is busy")]
        assert busy and all(not (r.hit or r.leader or r.pending) for r in busy)
        assert len(replies) - len(busy) >= MAX_QUEUE  # the queue's worth was looked up
        shed = metric(metrics_port, "cachemesh_semantic_cache_embed_shed_total") - shed_before
        assert shed == len(busy)


async def test_one_tenants_burst_leaves_another_tenants_lookups_their_turn() -> None:
    """Tenant a keeps a backlog of several seconds of embedding (its Lookups have 60 s); tenant
    b's Lookups, one at a time, are each embedded and searched (a ``best_similarity``: a search
    happened) after a few of a's batches at most (their turn), not after a's backlog, as when
    they waited at the back of one queue for all tenants. Counted, not timed: given the
    router's 2 s each, a loaded machine's batches (0.5-1.75 s a b Lookup) left one a miss for
    want of time, or its reply past the deadline, in 3 of 8 runs under CPU load.

    a's burst is sent in waves, each once the process holds the one before: gRPC itself keeps
    at most ``PENDING_CALLS`` calls the server has not yet taken and refuses others at random
    (CANCELLED, whatever their tenant), which a burst of 2,000 at once overflows on a loaded
    machine. Fairness among tenants is the process's, for the calls it holds; before, b's
    Lookup was now and then refused there, before the process saw it."""
    batch = 32
    # a's texts embedded while one of b's Lookups waits its turn: the batch running when it
    # came and the one it joins (a batch takes one text of each tenant in turn), and those
    # that began while it was on its way; with one queue for all, a's backlog (>= 200) first
    fair = 5 * batch
    with started(batch, 4096) as process:
        channel, stub = await ready(process, ("a", "b"))
        async with channel:
            embedded_before = metric(process.metrics_port, EMBEDDED)
            burst: list[asyncio.Future[sc.LookupResponse]] = []
            for wave in range(0, 2000, WAVE):
                burst += [
                    asyncio.ensure_future(
                        stub.Lookup(
                            sc.LookupRequest(tenant="a", request=request(question(i))),
                            metadata=AUTH,
                            timeout=60,
                        )
                    )
                    for i in range(wave, wave + WAVE)
                ]
                await held(process, embedded_before, burst, batch)
            searched, meanwhile = [], []
            for k in range(5):
                ask = request(f"tenant b asks about invoice {k} of its plan")
                before = metric(process.metrics_port, EMBEDDED)
                reply = await stub.Lookup(
                    sc.LookupRequest(tenant="b", request=ask), metadata=AUTH, timeout=60
                )
                searched.append(reply.best_similarity > 0)
                meanwhile.append(metric(process.metrics_port, EMBEDDED) - before - 1)
            backlog = metric(process.metrics_port, "cachemesh_semantic_cache_embed_queue")
            for call in burst:
                call.cancel()
            await asyncio.gather(*burst, return_exceptions=True)
        assert backlog >= 200  # a's burst was still queued while b asked
        assert searched == [True] * 5
        assert max(meanwhile) <= fair, meanwhile  # a's texts embedded while b waited


async def held(
    process: Process,
    embedded_before: float,
    burst: list[asyncio.Future[sc.LookupResponse]],
    batch: int,
) -> None:
    """Until the process holds the burst's Lookups (each queued for its embedding or embedded
    already; the ``batch`` being embedded is neither), for at most 60 s; one refused (an
    error, or skipped: the queue full) fails the set-up, saying why."""
    for _ in range(600):
        refused = [
            call.exception() or call.result().skip_reason
            for call in burst
            if call.done() and (call.exception() or call.result().skip_reason)
        ]
        if refused:
            raise AssertionError(f"{len(refused)} of a's Lookups refused: {refused[0]}")
        embedded = (
            metric(process.metrics_port, "cachemesh_semantic_cache_embed_batch_size_sum")
            - embedded_before
        )
        queued = metric(process.metrics_port, "cachemesh_semantic_cache_embed_queue")
        if queued + embedded >= len(burst) - batch:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"the process did not take {len(burst)} Lookups within 60 s")
