"""What L1's per-tenant Stats costs as tenants grow: its reply, and the router's GetStats pages.

A real semantic-cache servicer (no embedder: no entry is needed, each tenant has looked up
once, so it has a row) on loopback, asked over a channel with the router's options and
CACHEMESH_MAX_MESSAGE_BYTES's default (4 MiB); the router's Admin servicer in the same process
with one key (every other tenant is only L1's) and a prefix-cache answering TotalsBatch at once.
For each tenant count: the reply of the whole Stats (the request of a router older than its
pages) in bytes and seconds, or how it failed; L1's event loop held by one such Stats call,
and by one page of 1,000; the first GetStats page and, with ``--walk``, every page (seconds,
and the bytes L1 sent for them). ``--limit``: the fewest tenants whose whole reply fails.

    .venv/bin/python -m services.tools.bench.l1_stats [--tenants 10000 100000] [--walk]
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import grpc

from cachemesh._argv import Parser
from cachemesh.v1 import admin_pb2 as adm
from cachemesh.v1 import admin_pb2_grpc, prefix_cache_pb2_grpc, semantic_cache_pb2_grpc
from cachemesh.v1 import prefix_cache_pb2 as pc
from cachemesh.v1 import semantic_cache_pb2 as sc
from services.common.auth import InternalAuthInterceptor, internal_metadata
from services.common.channels import channel_options
from services.common.clock import ManualClock
from services.common.key_store import KeyStore
from services.common.keyfile import hash_key, new_api_key
from services.common.server import MAX_MESSAGE_BYTES_DEFAULT
from services.router.admin import AdminServicer
from services.router.admin_auth import AdminCredential, AuthFailures, Reason
from services.semantic_cache.api import SemanticCacheApi
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.embedder import Vectors
from services.semantic_cache.servicer import SemanticCacheService
from services.tools.arg_checks import at_least, within

_INTERNAL = "bench-internal-token-0123456789"
_ADMIN = "bench-admin-token-0123456789abcdef"
Context = grpc.aio.ServicerContext[Any, Any]


class _NoEmbedder:
    """No text is embedded here: the rows are counts, not entries."""

    version = "none@1"
    dim = 8

    def embed(self, texts: list[str]) -> Vectors:
        raise AssertionError("the bench embeds nothing")


class _Totals(prefix_cache_pb2_grpc.PrefixCacheServicer):
    async def Plan(self, request: pc.PlanRequest, context: Context) -> pc.PlanResponse:
        raise NotImplementedError  # the Admin API never plans

    async def Commit(self, request: pc.CommitRequest, context: Context) -> pc.CommitResponse:
        raise NotImplementedError  # nor commits

    async def Totals(self, request: pc.TotalsRequest, context: Context) -> pc.TotalsResponse:
        raise NotImplementedError  # GetStats asks TotalsBatch

    async def TotalsBatch(
        self, request: pc.TotalsBatchRequest, context: Context
    ) -> pc.TotalsBatchResponse:
        return pc.TotalsBatchResponse(
            tenants=[pc.TenantTotals(tenant=t, totals=pc.TotalsResponse()) for t in request.tenants]
        )


class _Counted:
    """The semantic-cache stub the Admin servicer calls, counting the bytes of Stats replies."""

    def __init__(self, stub: semantic_cache_pb2_grpc.SemanticCacheAsyncStub) -> None:
        self._stub = stub
        self.bytes = 0
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stub, name)

    async def Stats(self, request: sc.L1StatsRequest, **kwargs: Any) -> sc.L1StatsResponse:
        reply: sc.L1StatsResponse = await self._stub.Stats(request, **kwargs)
        self.bytes += reply.ByteSize()
        self.calls += 1
        return reply


def _name(i: int, chars: int) -> str:
    """The i-th tenant's name, ``chars`` long (13 at least: tenant-000000; 64 at most)."""
    return f"tenant-{i:06d}".ljust(chars, "x")


def _api(tenants: int, chars: int) -> SemanticCacheApi:
    api = SemanticCacheApi(SemanticCache(_NoEmbedder(), ManualClock(), threshold=0.8))
    for i in range(tenants):  # as a lookup of each counts it (a row of L1 figures each)
        api._counts.looked_up(_name(i, chars), hit=i % 3 == 0, exact=i % 6 == 0)
    return api


async def _measure(tenants: int, chars: int, walk: bool, work: Path) -> dict[str, Any]:
    api = _api(tenants, chars)
    result: dict[str, Any] = {"tenants": tenants, "name_chars": chars}
    started = time.perf_counter()
    whole = api.stats(sc.L1StatsRequest())
    result["l1_loop_held_s"] = round(time.perf_counter() - started, 3)
    result["whole_reply_bytes"] = whole.ByteSize()
    started = time.perf_counter()
    api.stats(sc.L1StatsRequest(page_size=1000, after=_name(tenants // 2, chars)))
    result["l1_loop_held_by_a_page_s"] = round(time.perf_counter() - started, 3)
    internal = grpc.aio.server(
        interceptors=[InternalAuthInterceptor(_INTERNAL)],
        options=channel_options(MAX_MESSAGE_BYTES_DEFAULT),
    )
    semantic_cache_pb2_grpc.add_SemanticCacheServicer_to_server(SemanticCacheService(api), internal)
    prefix_cache_pb2_grpc.add_PrefixCacheServicer_to_server(_Totals(), internal)
    port = internal.add_insecure_port("127.0.0.1:0")
    await internal.start()
    auth = internal_metadata(_INTERNAL)
    target = f"127.0.0.1:{port}"
    async with grpc.aio.insecure_channel(
        target, options=channel_options(MAX_MESSAGE_BYTES_DEFAULT)
    ) as channel:
        stub = semantic_cache_pb2_grpc.SemanticCacheStub(channel)
        started = time.perf_counter()
        try:
            await stub.Stats(sc.L1StatsRequest(), metadata=auth, timeout=60)
            result["whole_reply"] = "ok"
        except grpc.aio.AioRpcError as exc:
            result["whole_reply"] = f"{exc.code().name}: {exc.details()}"
        result["whole_reply_s"] = round(time.perf_counter() - started, 3)
        key_file = work / f"keys-{tenants}"
        key_file.write_text(f"{_name(0, chars)}:{hash_key(new_api_key())}\n")  # one key
        keys = KeyStore.open(key_file, time.monotonic, time.time, 0.0, start=lambda job: job())
        counted = _Counted(stub)
        admin = AdminServicer(
            AdminCredential(_ADMIN),
            keys,
            cast("semantic_cache_pb2_grpc.SemanticCacheAsyncStub", counted),
            prefix_cache_pb2_grpc.PrefixCacheStub(channel),
            auth,
            60.0,
            auth_failures=AuthFailures(time.monotonic, _not_counted),
        )
        router = grpc.aio.server()
        admin_pb2_grpc.add_AdminServicer_to_server(admin, router)
        router_port = router.add_insecure_port("127.0.0.1:0")
        await router.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{router_port}") as front:
            admin_stub = admin_pb2_grpc.AdminStub(front)
            token, pages, rows, failed = "", 0, 0, ""
            started = time.perf_counter()
            while True:
                try:
                    reply = await admin_stub.GetStats(
                        adm.GetStatsRequest(page_token=token),
                        metadata=(("authorization", f"Bearer {_ADMIN}"),),
                        timeout=120,
                    )
                except grpc.aio.AioRpcError as exc:
                    failed = f"{exc.code().name}: {exc.details()}"
                    break
                pages += 1
                rows += len(reply.tenants)
                if pages == 1:
                    result["first_page_s"] = round(time.perf_counter() - started, 3)
                    result["first_page_l1_bytes"] = counted.bytes
                    result["first_page_unavailable"] = list(reply.unavailable)
                token = reply.next_page_token
                if not token or not walk:
                    break
            if walk:
                result["every_page_s"] = round(time.perf_counter() - started, 3)
                result["pages"], result["rows"] = pages, rows
                result["every_page_l1_bytes"] = counted.bytes
            if failed:
                result["get_stats_failed"] = failed
        await router.stop(None)
    await internal.stop(None)
    return result


def _first_failing(names: int, chars: int) -> int:
    """The fewest tenants whose whole Stats reply is over CACHEMESH_MAX_MESSAGE_BYTES's
    default (each row as ``_api`` makes them), by bisection on the reply's size."""
    low, high = 1, names
    while low < high:
        middle = (low + high) // 2
        if _api(middle, chars).stats(sc.L1StatsRequest()).ByteSize() > MAX_MESSAGE_BYTES_DEFAULT:
            high = middle
        else:
            low = middle + 1
    return low


def main(argv: Sequence[str] | None = None) -> None:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--name-chars", type=int, default=13, help="13 (tenant-000001) to 64")
    parser.add_argument("--walk", action="store_true", help="every GetStats page, not the first")
    parser.add_argument("--limit", action="store_true", help="find the tenants where it fails")
    args = parser.parse_args(argv)
    for tenants in args.tenants:  # 0 tenants measured nothing: a report of empty figures
        at_least(parser, 1, tenants=tenants)
    within(parser, 13, 64, name_chars=args.name_chars)  # tenant-000000 .. a 64-character name
    with tempfile.TemporaryDirectory() as work:
        results = [
            asyncio.run(_measure(n, args.name_chars, args.walk, Path(work))) for n in args.tenants
        ]
    report: dict[str, Any] = {"results": results}
    if args.limit:
        report["whole_reply_fails_from_tenants"] = _first_failing(400_000, args.name_chars)
    print(json.dumps(report, indent=2))


def _not_counted(reason: Reason) -> None:
    """This benchmark presents the right token: a refusal would be logged, no metric kept."""


if __name__ == "__main__":
    main()
