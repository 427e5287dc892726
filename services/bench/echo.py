"""Reference: a bare gRPC echo through two hops on loopback (client → hop 1 → hop 2 → back).

Each hop is its own process with one ``grpc.aio`` server, as the router and a service are;
the payload is raw bytes (no protobuf work), so this is the floor a two-hop gRPC call costs.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from typing import Any

import grpc

from cachemesh.loadtest.stats import latency_summary

METHOD = "/cachemesh.bench.Echo/Echo"


def _identity(data: bytes) -> bytes:
    return data


async def _serve(forward_to: str | None, ports: mp.Queue[int], stop: Any) -> None:
    server = grpc.aio.server()
    channel = grpc.aio.insecure_channel(forward_to) if forward_to else None
    call = channel.unary_unary(METHOD, _identity, _identity) if channel else None

    async def echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return await call(request) if call is not None else request

    handler = grpc.method_handlers_generic_handler(
        "cachemesh.bench.Echo",
        {"Echo": grpc.unary_unary_rpc_method_handler(echo, _identity, _identity)},
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    ports.put(port)
    await asyncio.to_thread(stop.wait)  # the parent's multiprocessing Event
    await server.stop(0)


def _hop(forward_to: str | None, ports: mp.Queue[int], stop: Any) -> None:
    asyncio.run(_serve(forward_to, ports, stop))


async def _load(target: str, requests: int, concurrency: int, payload: bytes) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(METHOD, _identity, _identity)
        for _ in range(20):  # warm the connection
            await call(payload)
        latencies: list[float] = []
        todo = iter(range(requests))

        async def worker() -> None:
            for _ in todo:
                started = time.perf_counter()
                await call(payload)
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        "throughput_rps": round(len(latencies) / wall, 1),
        "latency_ms": latency_summary(latencies),
    }


def echo_reference(
    levels: tuple[int, ...], requests: int, payload_bytes: int
) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    ports: mp.Queue[int] = ctx.Queue()
    second = ctx.Process(target=_hop, args=(None, ports, stop), daemon=True)
    second.start()
    far = ports.get(timeout=60)
    first = ctx.Process(target=_hop, args=(f"127.0.0.1:{far}", ports, stop), daemon=True)
    first.start()
    near = ports.get(timeout=60)
    try:
        payload = b"x" * payload_bytes
        return [
            asyncio.run(_load(f"127.0.0.1:{near}", requests, level, payload)) for level in levels
        ]
    finally:
        stop.set()
        for hop in (first, second):
            hop.join(timeout=5)
            if hop.is_alive():
                hop.kill()
