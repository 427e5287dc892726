"""The L1 capacity on a real semantic-cache process: one tenant's flood of new questions
evicts its own older answers, not another tenant's, and a restart (kill -9: snapshot plus
write-ahead log) comes back holding the same entries."""

from __future__ import annotations

import signal
from pathlib import Path

import grpc
import pytest

from cachemesh.v1 import semantic_cache_pb2 as sc
from cachemesh.v1 import semantic_cache_pb2_grpc as sc_grpc
from services.tools.stack.ports import free_port
from tests.integration.test_semantic_crash import AUTH, answer, request, serving, start

pytestmark = pytest.mark.integration

CAPACITY = 20
FAQ = range(5)  # tenant b's tickets
FLOOD = range(100, 160)  # tenant a's: three times the capacity


async def held(stub: sc_grpc.SemanticCacheAsyncStub) -> tuple[dict[str, int], list[int]]:
    """Entries by tenant, and which of b's FAQ are exact hits."""
    stats = await stub.Stats(sc.L1StatsRequest(), metadata=AUTH, timeout=10)
    hits = []
    for i in FAQ:
        found = await stub.Lookup(sc.LookupRequest(tenant="b", request=request(i)), metadata=AUTH)
        if found.hit and found.match.exact:
            hits.append(i)
    return {t.tenant: t.entries for t in stats.tenants if t.entries}, hits


async def held_after_restart(
    data_dir: Path, port: int, extra: dict[str, str]
) -> tuple[dict[str, int], list[int]]:
    """``held`` once a new process has started on the data dir a killed one left."""
    restarted = start(data_dir, port, extra)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await serving(channel, restarted)
            return await held(sc_grpc.SemanticCacheStub(channel))
    finally:
        restarted.kill()
        restarted.wait(timeout=30)


async def test_a_tenant_flooding_l1_keeps_within_its_share_across_a_restart(
    tmp_path: Path,
) -> None:
    data_dir, port = tmp_path / "data", free_port()
    extra = {"SEMANTIC_CACHE_MAX_ENTRIES": str(CAPACITY)}
    process = start(data_dir, port, extra)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await serving(channel, process)
            stub = sc_grpc.SemanticCacheStub(channel)
            for tenant, tickets in (("b", FAQ), ("a", FLOOD)):
                for i in tickets:
                    store = sc.StoreRequest(tenant=tenant, request=request(i), answer=answer(i))
                    assert (await stub.Store(store, metadata=AUTH, timeout=10)).stored
            before = await held(stub)
            assert before == ({"a": CAPACITY - len(FAQ), "b": len(FAQ)}, list(FAQ))
            process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait(timeout=30)
    assert await held_after_restart(data_dir, port, extra) == before


async def test_a_tenants_large_answers_stay_within_the_byte_bound_across_a_restart(
    tmp_path: Path,
) -> None:
    """Bounded by entries alone, 60 answers of 100 kB were all held (6 MB past a 1 MB bound);
    by bytes, tenant a keeps what b's small answers leave of it, b keeps all of them."""
    data_dir, port = tmp_path / "data", free_port()
    extra = {"SEMANTIC_CACHE_MAX_ENTRIES": "1000", "SEMANTIC_CACHE_MAX_BYTES": "1000000"}
    large = "x" * 100_000
    process = start(data_dir, port, extra)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await serving(channel, process)
            stub = sc_grpc.SemanticCacheStub(channel)
            for i in FAQ:
                store = sc.StoreRequest(tenant="b", request=request(i), answer=answer(i))
                assert (await stub.Store(store, metadata=AUTH, timeout=10)).stored
            for i in FLOOD:
                big = answer(i)
                big.content[0].text = large
                store = sc.StoreRequest(tenant="a", request=request(i), answer=big)
                assert (await stub.Store(store, metadata=AUTH, timeout=10)).stored
            before = await held(stub)
            assert before[1] == list(FAQ)
            assert before[0]["b"] == len(FAQ)
            assert before[0]["a"] == 9  # 9 x 100 kB and b's answers fit; 10 do not
            too_large = answer(0)
            too_large.content[0].text = "y" * 1_000_000
            refused = await stub.Store(
                sc.StoreRequest(tenant="b", request=request(99), answer=too_large),
                metadata=AUTH,
                timeout=10,
            )
            assert not refused.stored and "SEMANTIC_CACHE_MAX_BYTES" in refused.skip_reason
            assert await held(stub) == before
            process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait(timeout=30)
    assert await held_after_restart(data_dir, port, extra) == before
