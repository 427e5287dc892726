"""(e) the HTTP front's overhead: the same requests through ``POST /v1/messages`` and through
the Gateway's gRPC ``Complete``, side by side on one stack of their own (``SIM_TIME_SCALE=0``,
no trace export): exact L1 hits (the warm-up stores ``POOL`` Quora questions, the plan asks
them again) and misses (each question in a cache namespace of its own, so the model answers).

Each point runs a closed loop at N in flight with the same client code on both paths (asyncio;
grpc.aio for gRPC, an aiohttp session with keep-alive for HTTP), gRPC then HTTP, then HTTP then
gRPC, pooled, so a drift of the machine's other load falls on both. A row gives req/s and p50 /
p99 per path, the HTTP path's req/s as a ratio to the gRPC path's, the CPU each service spent
per request, and how many answers came from the wrong layer (an exact hit not served by L1).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc

from cachemesh.loadtest.stats import percentile
from cachemesh.loadtest.workloads.base import data_file
from cachemesh.loadtest.workloads.faq import PAIRS, faq_request, load_pairs
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import gateway_pb2_grpc
from services.tools.arg_checks import at_least
from services.tools.bench.gateway.cpu import per_request, ticks_between
from services.tools.bench.gateway.runs import Plan
from services.tools.bench.gateway.stacks import SIM_ZERO, TRACES_OFF, Target, bench_stack
from services.tools.out_path import refuse_unwritable
from services.tools.stack.environment import dial_address

CASE = "e_http_front"
POOL = 50
MISS_FACTOR = 2  # misses send plan.requests / MISS_FACTOR per path and level (they are slow)
TIMEOUT_S = 60.0
GRPC, HTTP = "grpc", "http"


@dataclass
class Point:
    latencies_s: list[float]
    wall_s: float
    errors: int
    wrong_layer: int
    cpu_ticks: dict[str, int] | None


Send = Callable[[pb.CompleteRequest], Awaitable[bool]]  # True when served by the expected layer


def messages_body(request: pb.CompleteRequest) -> dict[str, Any]:
    """A text-only Gateway request as the Messages API body the HTTP path sends."""
    roles = {pb.ROLE_USER: "user", pb.ROLE_ASSISTANT: "assistant"}
    body: dict[str, Any] = {
        "model": request.model,
        "max_tokens": request.max_tokens,
        "messages": [
            {"role": roles[m.role], "content": "".join(b.text for b in m.content)}
            for m in request.messages
        ],
    }
    if request.system:
        body["system"] = "".join(b.text for b in request.system)
    return body


async def _closed_loop(send: Send, plan: Sequence[pb.CompleteRequest], level: int) -> Point:
    latencies: list[float] = []
    errors = wrong = 0
    queue = iter(plan)

    async def worker() -> None:
        nonlocal errors, wrong
        for request in queue:
            started = time.perf_counter()
            try:
                right = await send(request)
            except (TimeoutError, grpc.aio.AioRpcError, aiohttp.ClientError):
                errors += 1
                continue
            latencies.append(time.perf_counter() - started)
            wrong += 0 if right else 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(level)))
    return Point(latencies, time.perf_counter() - started, errors, wrong, None)


async def _run(
    path: str, target: Target, http: str, plan: Sequence[pb.CompleteRequest], level: int,
    expect: int,
) -> Point:  # fmt: skip
    key = target.keys["tenant-a"]
    if path == GRPC:
        async with grpc.aio.insecure_channel(target.address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            metadata = (("authorization", f"Bearer {key}"),)

            async def send_grpc(request: pb.CompleteRequest) -> bool:
                reply = await stub.Complete(request, metadata=metadata, timeout=TIMEOUT_S)
                return bool(reply.served_by == expect)

            return await _measured(target, send_grpc, plan, level)
    layer = "semantic-cache" if expect == pb.LAYER_SEMANTIC_CACHE else None
    connector = aiohttp.TCPConnector(limit=level)
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        url = f"http://{http}/v1/messages"
        headers = {"x-api-key": key, "anthropic-version": "2023-06-01"}
        headers["content-type"] = "application/json"
        # encoded before the clock starts, as the gRPC path's messages are built before it
        bodies = {id(r): json.dumps(messages_body(r)).encode() for r in plan}

        async def send_http(request: pb.CompleteRequest) -> bool:
            ns = {"x-cachemesh-namespace": request.cache.namespace}
            async with session.post(
                url, data=bodies[id(request)], headers={**headers, **ns}
            ) as reply:
                await reply.read()
                if reply.status != 200:
                    raise aiohttp.ClientResponseError(reply.request_info, (), status=reply.status)
                served = reply.headers.get("x-cachemesh-served-by")
                return served == layer if layer else served != "semantic-cache"

        return await _measured(target, send_http, plan, level)


async def _measured(
    target: Target, send: Send, plan: Sequence[pb.CompleteRequest], level: int
) -> Point:
    warm = min(len(plan) // 4, level * 2)
    for request in plan[:warm]:  # opens the connections and warms the path, not measured
        await send(request)
    before = target.cpu.sample() if target.cpu else None
    point = await _closed_loop(send, plan[warm:], level)
    after = target.cpu.sample() if target.cpu else None
    if before is not None and after is not None:
        point.cpu_ticks = ticks_between(before, after)
    return point


def _summary(target: Target, points: Sequence[Point]) -> dict[str, Any]:
    latencies = sorted(s for p in points for s in p.latencies_s)
    wall = sum(p.wall_s for p in points)
    row: dict[str, Any] = {
        "completed": len(latencies),
        "errors": sum(p.errors for p in points),
        "wrong_layer": sum(p.wrong_layer for p in points),
        "throughput_rps": round(len(latencies) / wall, 1) if wall else 0.0,
        "latency_ms": {  # nearest rank, as every other latency of the reports
            "p50": round(1000 * percentile(latencies, 0.50), 2) if latencies else None,
            "p99": round(1000 * percentile(latencies, 0.99), 2) if latencies else None,
        },
    }
    ticks = [p.cpu_ticks for p in points]
    if target.cpu is not None and all(t is not None for t in ticks):
        spent = {name: sum(t[name] for t in ticks if t is not None) for name in target.cpu.pids}
        row["cpu"] = per_request(spent, len(latencies), target.cpu.ticks_per_s)
    return row


def _questions(data_dir: Path, count: int) -> list[str]:
    seen: dict[str, None] = {}
    for a, _, _ in load_pairs(data_file(data_dir, PAIRS)):
        seen.setdefault(a.strip(), None)
        if len(seen) == count:
            break
    return list(seen)


def _point(
    target: Target, http: str, plan: Sequence[pb.CompleteRequest], level: int, expect: int,
    order: tuple[str, ...],
) -> dict[str, Any]:  # fmt: skip
    """Both paths at ``level``, each run twice in the order given then reversed (A B B A),
    pooled; each run sends its own quarter of ``plan`` (a miss is asked once)."""
    points: dict[str, list[Point]] = {GRPC: [], HTTP: []}
    quarter = len(plan) // 4
    for i, path in enumerate((*order, *order[::-1])):
        part = plan[i * quarter : (i + 1) * quarter]
        points[path].append(asyncio.run(_run(path, target, http, part, level, expect)))
    row: dict[str, Any] = {
        "concurrency": level,
        **{p: _summary(target, points[p]) for p in (GRPC, HTTP)},
    }
    g, h = row[GRPC]["throughput_rps"], row[HTTP]["throughput_rps"]
    row["http_to_grpc_rps"] = round(h / g, 3) if g else None
    return row


def compare(plan: Plan) -> dict[str, Any]:
    """(e) on a stack of its own: exact hits and misses, gRPC and HTTP, at each level."""
    with bench_stack(plan.root, "http", {**SIM_ZERO, **TRACES_OFF}) as stack:
        target = stack.target
        http = dial_address(stack.overrides["HTTP_FRONT_LISTEN"])
        questions = _questions(plan.data_dir, POOL + plan.requests)
        namespace = f"{plan.run}-http-exact"
        stored = [faq_request(q, namespace) for q in questions[:POOL]]
        asyncio.run(_run(GRPC, target, http, stored, 4, pb.LAYER_MODEL))  # stores the pool
        exact: list[dict[str, Any]] = []
        misses: list[dict[str, Any]] = []
        for i, level in enumerate(plan.levels):
            order = (GRPC, HTTP) if i % 2 == 0 else (HTTP, GRPC)
            hits = list(itertools.islice(itertools.cycle(stored), plan.requests * 6))
            exact.append(_point(target, http, hits, level, pb.LAYER_SEMANTIC_CACHE, order))
            count = max(8, 2 * plan.requests // MISS_FACTOR)
            fresh = [
                faq_request(q, f"{plan.run}-http-miss-{level}/{j}")
                for j, q in enumerate(itertools.islice(itertools.cycle(questions), count))
            ]
            misses.append(_point(target, http, fresh, level, pb.LAYER_MODEL, order))
        return {
            "stack": stack.name,
            "overrides": sorted(stack.overrides),
            "exact_hits": exact,
            "misses": misses,
        }


def render(result: dict[str, Any] | None) -> str:
    """The terminal table of (e)."""
    if not result:
        return ""
    lines = ["(e) HTTP front vs gRPC Gateway (req/s, p50 / p99 ms, HTTP / gRPC req/s)"]
    for name in ("exact_hits", "misses"):
        for row in result[name]:
            g, h = row[GRPC], row[HTTP]
            lines.append(
                f"  {name:10} x{row['concurrency']:<3} gRPC {g['throughput_rps']:>7,.0f}/s "
                f"{g['latency_ms']['p50']:>6} / {g['latency_ms']['p99']:<7} "
                f"HTTP {h['throughput_rps']:>7,.0f}/s {h['latency_ms']['p50']:>6} / "
                f"{h['latency_ms']['p99']:<7} ratio {row['http_to_grpc_rps']}"
            )
    return "\n".join(lines)


def main() -> None:
    """``python -m services.tools.bench.gateway.http_path``: (e) alone, printed and written."""
    from cachemesh._argv import Parser
    from services.tools.bench.gateway.run import LEVELS, ROOT

    parser = Parser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench-http.json")
    args = parser.parse_args()
    refuse_unwritable(parser, args.out)  # before the run, not after it
    at_least(parser, 1, requests=args.requests)  # as bench.gateway's: the same plan's count
    plan = Plan(ROOT, args.data_dir, f"bench-http-{time.time_ns()}", LEVELS, args.requests, 0, [])
    result = compare(plan)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(render(result))
    print(f"bench: {args.out}")


if __name__ == "__main__":
    main()
