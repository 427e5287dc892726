"""kill -9 during writes: nothing acknowledged is lost, nothing corrupt is served.

A real semantic-cache process persists to a data directory (write-ahead log plus snapshots
taken every 0.2 s, so rotations happen during the writes). Many Stores run concurrently;
the process is killed with SIGKILL while they are in flight. A new process on the same
directory must serve every acknowledged entry, exactly (same entry id, same answer), and an
entry that was in flight and not acknowledged is either absent or correct, never another's;
every answer it serves, exact or paraphrase hit, is byte for byte one of those writes'.
Then a drain: once SIGTERM has begun it, a write is refused with UNAVAILABLE (never
acknowledged, never CANCELLED).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import semantic_cache_pb2 as sc
from cachemesh.v1 import semantic_cache_pb2_grpc as sc_grpc
from services.common.auth import internal_metadata
from services.tools.stack.ports import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "crash-test-internal-token-0123456789"
AUTH = internal_metadata(TOKEN)
WRITERS = 8
# the kill -9 purge test's counts: purges and Stores while they run, Stores after them
PURGES, STORES_DURING, STORES_AFTER = 20, 50, 50


def start(
    data_dir: Path, port: int, extra: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "SEMANTIC_CACHE_LISTEN": f"127.0.0.1:{port}",
        "SEMANTIC_CACHE_METRICS_LISTEN": "127.0.0.1:0",  # any free port
        "CACHEMESH_INTERNAL_TOKEN": TOKEN,
        "OTEL_TRACES_EXPORTER": "none",
        "CACHEMESH_GRACE_S": "5",
        "SEMANTIC_CACHE_DATA_DIR": str(data_dir),
        "SEMANTIC_CACHE_SNAPSHOT_S": "0.2",
        **(extra or {}),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "services.semantic_cache"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


async def serving(channel: grpc.aio.Channel, process: subprocess.Popen[bytes]) -> None:
    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    for _ in range(2400):
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        try:
            reply = await check(health_pb2.HealthCheckRequest(service="cachemesh.v1.SemanticCache"))
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError("semantic-cache not SERVING within 120 s")


def request(i: int, reworded: bool = False) -> pb.CompleteRequest:
    text = f"What is the status of ticket number {i}?"
    if reworded:  # a paraphrase: a hit on it is not exact
        text = f"Could you tell me the status of ticket number {i}, please?"
    return pb.CompleteRequest(
        model="sim-small",
        max_tokens=100,
        system=[pb.ContentBlock(text="You are a support bot.")],
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=text)])],
    )


def answer(i: int) -> sc.CachedAnswer:
    return sc.CachedAnswer(
        content=[pb.ContentBlock(text=f"Ticket {i} is resolved.")],
        model="sim-small",
        stop_reason="end_turn",
        output_tokens=6,
    )


async def test_kill_9_during_writes_loses_nothing_acknowledged(tmp_path: Path) -> None:
    data_dir, port = tmp_path / "data", free_port()
    acknowledged: dict[int, str] = {}
    enough = asyncio.Event()  # 300 acknowledged: time to kill
    in_flight: list[int] = []
    process = start(data_dir, port)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await serving(channel, process)
            stub = sc_grpc.SemanticCacheStub(channel)

            async def writer(w: int) -> None:
                i = w
                while True:
                    store = sc.StoreRequest(tenant="t", request=request(i), answer=answer(i))
                    try:
                        reply = await stub.Store(store, metadata=AUTH, timeout=10)
                    except grpc.aio.AioRpcError:
                        in_flight.append(i)  # the process died under this call: not acknowledged
                        return
                    assert reply.stored
                    acknowledged[i] = reply.entry_id
                    if len(acknowledged) >= 300:
                        enough.set()
                    i += WRITERS

            writers = [asyncio.create_task(writer(w)) for w in range(WRITERS)]
            await asyncio.wait_for(enough.wait(), timeout=120)
            process.send_signal(signal.SIGKILL)  # in the middle of the writes
            await asyncio.gather(*writers)
    finally:
        process.kill()
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert len(in_flight) == WRITERS  # every writer had a call in flight when it died
    assert (data_dir / "semantic-cache.snapshot").is_file()  # snapshots rotated the log

    restarted = start(data_dir, port)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await serving(channel, restarted)
            stub = sc_grpc.SemanticCacheStub(channel)
            served = await check_served(stub, acknowledged, in_flight)
            assert served["paraphrase"] > 0  # the rewordings did reach the paraphrase path
            # a drain has begun: writes are refused (UNAVAILABLE, saying why), never half-done
            restarted.send_signal(signal.SIGTERM)
            refused = None
            for _ in range(200):
                try:
                    await stub.Store(
                        sc.StoreRequest(tenant="t", request=request(-1), answer=answer(-1)),
                        metadata=AUTH,
                        timeout=5,
                    )
                except grpc.aio.AioRpcError as exc:
                    refused = exc
                    break
                await asyncio.sleep(0.01)  # this Store ran before the signal was handled
            assert refused is not None
            assert refused.code() == grpc.StatusCode.UNAVAILABLE, refused
            assert "draining" in (refused.details() or "")  # the servicer's reason
            with pytest.raises(grpc.aio.AioRpcError) as dropped:
                await stub.Drop(sc.DropRequest(tenant="t"), metadata=AUTH, timeout=5)
            assert dropped.value.code() == grpc.StatusCode.UNAVAILABLE, dropped.value
            assert "draining" in (dropped.value.details() or "")
        assert restarted.wait(timeout=60) == 0
    finally:
        if restarted.poll() is None:
            restarted.kill()
            restarted.wait(timeout=30)


async def check_served(
    stub: sc_grpc.SemanticCacheAsyncStub, acknowledged: dict[int, str], in_flight: list[int]
) -> dict[str, int]:
    """Asks for every ticket, worded as stored and reworded; returns the hits by kind.

    Every acknowledged write is an exact hit with its entry id. Every answer served, exact or
    paraphrase, is byte for byte the answer of the write its entry id belongs to: an
    acknowledged one, or one in flight at the kill (its id unknown, so known by its answer, and
    then the same for every lookup serving that id). An exact hit is the asked ticket's write.
    """
    writes = {entry_id: i for i, entry_id in acknowledged.items()}  # entry id -> its write
    assert len(writes) == len(acknowledged)  # one entry id per acknowledged write
    entry_ids = dict(acknowledged)  # write -> its entry id, in-flight ones once first served
    unacknowledged = {payload(answer(i)): i for i in in_flight}
    lost: list[int] = []
    corrupt: list[tuple[int, str, str]] = []
    kinds = {"exact": 0, "paraphrase": 0}
    for i in range(max([*acknowledged, *in_flight]) + 1):
        for reworded in (False, True):
            asked = sc.LookupRequest(tenant="t", request=request(i, reworded))
            found = await stub.Lookup(asked, metadata=AUTH)
            exact = found.hit and found.match.exact
            entry_id, served = found.match.entry_id, payload(found.answer)
            if i in acknowledged and not reworded and not (exact and entry_id == acknowledged[i]):
                lost.append(i)
            if not found.hit:
                continue
            kinds["exact" if exact else "paraphrase"] += 1
            write = writes.get(entry_id, unacknowledged.get(served))
            if write is None:
                corrupt.append((i, entry_id, "neither acknowledged nor in flight"))
            elif served != payload(answer(write)):
                corrupt.append((i, entry_id, f"not the answer of write {write}"))
            elif entry_ids.setdefault(write, entry_id) != entry_id:
                corrupt.append((i, entry_id, f"write {write} is {entry_ids[write]}"))
            elif exact and (reworded or write != i):
                corrupt.append((i, entry_id, f"an exact hit on write {write}"))
            else:
                writes[entry_id] = write  # an in-flight write's id: its answer from now on
    assert lost == [] and corrupt == []
    return kinds


def payload(message: sc.CachedAnswer) -> bytes:
    return message.SerializeToString(deterministic=True)


@pytest.mark.parametrize("snapshot_s", ["0.2", "0"])
async def test_kill_9_during_stores_and_purges_brings_back_nothing_purged(
    tmp_path: Path, snapshot_s: str
) -> None:
    """Stores (each after its Lookup, as the router sends them) and purges of their namespaces
    run together; then the purges stop, the Stores go on, and the process is killed with
    SIGKILL mid-write (snapshots every 0.2 s, rotating the log during the writes; or none but
    the one 5 s after a purge, so the restart replays the purges from the log). The new
    process serves no acknowledged Store that a purge of its namespace, sent after the
    Store's reply, removed (the log replays them in the order they were made durable), and
    every acknowledged Store sent after the last purge of its namespace had been
    acknowledged. Stores whose calls overlap a purge of their namespace may be either, and
    are not asked. A replay that skipped the purges served purged Stores again: 90 and 6 in two
    runs of 40 purges and 100 Stores after them, 25 with the counts halved (20, 50); none
    when the kill came over 5 s after the last purge (the snapshot 5 s after a purge holds
    them all: nothing to replay)."""
    data_dir, port = tmp_path / "data", free_port()
    clock = 0  # the order of the calls' ends, as this client saw them
    stores: list[tuple[str, int, int, int]] = []  # namespace, ticket, sent, acknowledged
    drops: list[tuple[str, int, int]] = []  # namespace, sent, acknowledged
    purging, after_purges = asyncio.Event(), asyncio.Event()
    acknowledged = asyncio.Event()  # a Store acknowledged (the purger paces itself by them)
    purging.set()
    acknowledged_after = 0

    def ticket(i: int, namespace: str) -> pb.CompleteRequest:
        asked = request(i)
        asked.cache.namespace = namespace
        asked.request_id = f"ticket-{i}"
        return asked

    process = start(data_dir, port, {"SEMANTIC_CACHE_SNAPSHOT_S": snapshot_s})
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await serving(channel, process)
            stub = sc_grpc.SemanticCacheStub(channel)

            async def writer(w: int) -> None:
                nonlocal clock, acknowledged_after
                i = w
                while True:
                    namespace = f"ns{i % 4}"
                    asked = ticket(i, namespace)
                    try:
                        lookup = sc.LookupRequest(tenant="t", request=asked)
                        await stub.Lookup(lookup, metadata=AUTH, timeout=10)
                        sent = clock
                        store = sc.StoreRequest(tenant="t", request=asked, answer=answer(i))
                        reply = await stub.Store(store, metadata=AUTH, timeout=10)
                    except grpc.aio.AioRpcError:
                        return  # the process died under this call
                    clock += 1
                    if reply.stored:
                        stores.append((namespace, i, sent, clock))
                        acknowledged.set()
                        if not purging.is_set():
                            acknowledged_after += 1
                            if acknowledged_after >= STORES_AFTER:
                                after_purges.set()
                    i += WRITERS

            async def purger() -> None:
                nonlocal clock
                k = 0
                while len(drops) < PURGES or len(stores) < STORES_DURING:
                    await asyncio.sleep(0.02)
                    # two Stores acknowledged between purges: a Store whose Lookup came before
                    # a purge of its tenant is refused (the purge guard), so purges sent faster
                    # than a loaded machine's Lookup-then-Store refused every Store (2 of 9
                    # runs waited out the 120 s)
                    wanted = len(stores) + 2
                    while len(stores) < wanted and any(not w.done() for w in writers):
                        acknowledged.clear()
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(acknowledged.wait(), 1.0)
                    namespace, sent = f"ns{k % 4}", clock
                    drop = sc.DropRequest(tenant="t", namespace=namespace)
                    await stub.Drop(drop, metadata=AUTH, timeout=10)
                    clock += 1
                    drops.append((namespace, sent, clock))
                    k += 1
                purging.clear()

            writers = [asyncio.create_task(writer(w)) for w in range(WRITERS)]
            await asyncio.wait_for(purger(), timeout=120)
            await asyncio.wait_for(after_purges.wait(), timeout=120)
            process.send_signal(signal.SIGKILL)
            await asyncio.gather(*writers)
    finally:
        process.kill()
        process.wait(timeout=30)

    purged, kept = set(), set()
    for namespace, i, sent, acked in stores:
        mine = [(d_sent, d_acked) for ns, d_sent, d_acked in drops if ns == namespace]
        if any(d_sent >= acked for d_sent, _ in mine):
            purged.add((namespace, i))
        elif all(d_acked <= sent for _, d_acked in mine):
            kept.add((namespace, i))
    # both kinds were written: STORES_AFTER Stores acknowledged after the purges, but those sent
    # before the last one was (one a writer at most)
    assert len(purged) >= 5 and len(kept) >= STORES_AFTER - WRITERS

    restarted = start(data_dir, port)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await serving(channel, restarted)
            stub = sc_grpc.SemanticCacheStub(channel)
            served: dict[tuple[str, int], bool] = {}
            for namespace, i in sorted(purged | kept):
                asked = sc.LookupRequest(tenant="t", request=ticket(i, namespace))
                found = await stub.Lookup(asked, metadata=AUTH)
                served[(namespace, i)] = found.hit and found.match.exact
    finally:
        restarted.kill()
        restarted.wait(timeout=30)
    assert sorted(key for key in purged if served[key]) == []  # purged, back after the crash
    assert sorted(key for key in kept if not served[key]) == []  # acknowledged, lost
