"""The semantic-cache process with SEMANTIC_CACHE_DATA_DIR: its entries survive a restart."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import semantic_cache_pb2 as sc
from cachemesh.v1 import semantic_cache_pb2_grpc as sc_grpc
from services.common.auth import internal_metadata
from services.common.env import ConfigError, Env
from services.semantic_cache.app import SERVICE_NAME, serve
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.journal import WalJournal
from services.semantic_cache.operating_point import OperatingPoint
from services.semantic_cache.persistence import SNAPSHOT_NAME, SnapshotStore
from services.semantic_cache.settings import SemanticCacheSettings
from services.semantic_cache.snapshotter import Snapshotter
from services.semantic_cache.wal import WriteAheadLog
from services.tools.stack.ports import free_port
from tests.unit.semantic_cache_support import make_request

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "test-internal-token-0123456789"
SHIPPED = OperatingPoint(0.88, 0.0, 0.0)
QUESTION = "How do I export my invoices as PDF?"


def environ(data_dir: Path) -> dict[str, str]:
    port = free_port()
    return {
        "SEMANTIC_CACHE_LISTEN": f"127.0.0.1:{port}",
        "SEMANTIC_CACHE_METRICS_LISTEN": "127.0.0.1:0",  # any free port
        "CACHEMESH_INTERNAL_TOKEN": TOKEN,
        "OTEL_TRACES_EXPORTER": "none",
        "CACHEMESH_GRACE_S": "0",
        "SEMANTIC_CACHE_DATA_DIR": str(data_dir),
        "SEMANTIC_CACHE_SNAPSHOT_S": "0",  # only at shutdown: the restart proves the stop path
    }


async def wait_serving(channel: grpc.aio.Channel, task: asyncio.Task[None]) -> None:
    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    for _ in range(600):
        if task.done():
            task.result()
            raise AssertionError("serve() returned before SERVING")
        try:
            reply = await check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError("not SERVING in time")


async def run_once(env: dict[str, str], *, store: bool) -> sc.LookupResponse:
    """Starts the service, optionally stores QUESTION, looks it up, then stops it (SIGTERM path)."""
    stop = asyncio.Event()
    task = asyncio.create_task(serve(env, stop))
    try:
        async with grpc.aio.insecure_channel(env["SEMANTIC_CACHE_LISTEN"]) as channel:
            await wait_serving(channel, task)
            stub = sc_grpc.SemanticCacheStub(channel)
            auth = internal_metadata(TOKEN)
            if store:
                answer = sc.CachedAnswer(
                    content=[pb.ContentBlock(text="Open Settings.")],
                    stop_reason="end_turn",
                    output_tokens=7,
                )
                request = sc.StoreRequest(
                    tenant="t1", request=make_request(QUESTION), answer=answer
                )
                assert (await stub.Store(request, metadata=auth)).stored
            lookup = sc.LookupRequest(tenant="t1", request=make_request(QUESTION))
            return await stub.Lookup(lookup, metadata=auth)
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=30)


async def test_an_exact_hit_is_served_after_a_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "semantic-cache"  # created by the service
    first = await run_once(environ(data_dir), store=True)
    assert first.hit and first.match.exact
    assert (data_dir / SNAPSHOT_NAME).is_file()  # written at shutdown, after the drain
    second = await run_once(environ(data_dir), store=False)
    assert second.hit and second.match.exact and second.match.similarity == 1.0
    assert second.match.entry_id == first.match.entry_id
    assert second.answer.output_tokens == 7


async def test_health_answers_while_the_log_is_replayed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replay of the write-ahead log runs off the event loop, as the snapshot's restore
    does: a replay held up (here on an event; for real, 100k records from the log alone)
    leaves health answering NOT_SERVING, not timing out (a liveness probe would kill it)."""
    data_dir = tmp_path / "semantic-cache"
    wal = WriteAheadLog(data_dir / "wal")
    wal.open()
    WalJournal(wal).log_drop("t1", None, lambda: None)  # a record left by a crash
    await wal.sync()
    wal.close()
    replaying, release = threading.Event(), threading.Event()
    real_apply_drop = SemanticCache.apply_drop

    def held_apply_drop(self: SemanticCache, tenant: str, namespace: str | None = None) -> int:
        replaying.set()
        release.wait(timeout=60)  # set by the probe once health answered (or did not)
        return real_apply_drop(self, tenant, namespace)

    monkeypatch.setattr(SemanticCache, "apply_drop", held_apply_drop)
    env = environ(data_dir)

    def probe() -> int:  # another thread: the test's loop is the server's
        try:
            assert replaying.wait(timeout=120), "the replay never started"
            with grpc.insecure_channel(env["SEMANTIC_CACHE_LISTEN"]) as channel:
                check = channel.unary_unary(
                    "/grpc.health.v1.Health/Check",
                    request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                    response_deserializer=health_pb2.HealthCheckResponse.FromString,
                )
                reply = check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
                return int(reply.status)
        finally:
            release.set()

    stop = asyncio.Event()
    task = asyncio.create_task(serve(env, stop))
    try:
        status = await asyncio.to_thread(probe)
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        async with grpc.aio.insecure_channel(env["SEMANTIC_CACHE_LISTEN"]) as channel:
            await wait_serving(channel, task)
    finally:
        release.set()
        stop.set()
        await asyncio.wait_for(task, timeout=30)


async def test_a_stop_during_the_replay_keeps_the_lock_until_the_replay_has_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGTERM while the log is replayed: the warm-up is cancelled, its worker thread is not.
    Before, serve() released the data directory's .lock at once and the replay went on to open
    a segment (and, past 10,000 records, save a snapshot and delete segments) with the lock free
    for a second process. Now the lock is released only once the replay has stopped, and the
    directory is left as the crash left it (the records are replayed by the next start)."""
    data_dir = tmp_path / "semantic-cache"
    wal = WriteAheadLog(data_dir / "wal")
    wal.open()
    journal = WalJournal(wal)
    for i in range(3):  # records left by a crash
        journal.log_drop(f"t{i}", None, lambda: None)
    await wal.sync()
    wal.close()
    replaying, release, replayed = threading.Event(), threading.Event(), threading.Event()
    real_apply_drop = SemanticCache.apply_drop
    real_replay = Snapshotter._replay
    real_close = SnapshotStore.close
    replay_running_at_close: list[bool] = []

    def held_apply_drop(self: SemanticCache, tenant: str, namespace: str | None = None) -> int:
        replaying.set()
        # released when the lock is (never while this runs, once fixed), or after a second
        release.wait(timeout=1)
        return real_apply_drop(self, tenant, namespace)

    def replay(
        self: Snapshotter, cache: SemanticCache, wal_seq: int, snapshot: bool, unstamped: str
    ) -> float | Exception | None:
        try:
            return real_replay(self, cache, wal_seq, snapshot, unstamped)
        finally:
            replayed.set()

    def close(self: SnapshotStore) -> None:
        replay_running_at_close.append(not replayed.is_set())
        real_close(self)
        release.set()

    monkeypatch.setattr(SemanticCache, "apply_drop", held_apply_drop)
    monkeypatch.setattr(Snapshotter, "_replay", replay)
    monkeypatch.setattr(SnapshotStore, "close", close)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(environ(data_dir), stop))
    try:
        assert await asyncio.to_thread(replaying.wait, 120), "the replay never started"
        before = sorted(os.listdir(data_dir / "wal"))
        stop.set()  # SIGTERM
        await asyncio.wait_for(task, timeout=30)
    finally:
        release.set()
        stop.set()
        if not task.done():
            await asyncio.wait_for(task, timeout=30)
    assert replay_running_at_close == [False]
    assert await asyncio.to_thread(replayed.wait, 30)
    assert sorted(os.listdir(data_dir / "wal")) == before
    assert not (data_dir / SNAPSHOT_NAME).exists()


def test_a_corrupt_snapshot_stops_the_process_naming_the_file(tmp_path: Path) -> None:
    # A real process: a failed warm-up must end it (with the error), not leave it serving.
    snapshot = tmp_path / SNAPSHOT_NAME
    snapshot.write_bytes(b'{"format": "something else"}\n')
    result = subprocess.run(
        [sys.executable, "-m", "services.semantic_cache"],
        cwd=ROOT,
        env={**environ(tmp_path), "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    assert f"SnapshotError: semantic-cache snapshot {snapshot}: unreadable" in result.stderr
    assert snapshot.read_bytes() == b'{"format": "something else"}\n'  # never overwritten


async def test_an_unusable_data_dir_fails_fast_naming_the_variable(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(ConfigError, match="SEMANTIC_CACHE_DATA_DIR"):
        await serve(environ(tmp_path / "file" / "cache"))


@pytest.mark.parametrize("value", ["-1", "soon"])
def test_a_bad_snapshot_period_names_its_variable(value: str) -> None:
    with pytest.raises(ConfigError, match="SEMANTIC_CACHE_SNAPSHOT_S"):
        SemanticCacheSettings.from_env(Env({"SEMANTIC_CACHE_SNAPSHOT_S": value}), SHIPPED)


def test_persistence_is_off_unless_a_data_dir_is_set() -> None:
    blank = SemanticCacheSettings.from_env(Env({"SEMANTIC_CACHE_DATA_DIR": " "}), SHIPPED)
    assert blank.data_dir is None
    config = SemanticCacheSettings.from_env(Env({"SEMANTIC_CACHE_DATA_DIR": "/x"}), SHIPPED)
    assert (str(config.data_dir), config.snapshot_s) == ("/x", 60.0)
