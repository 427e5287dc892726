"""References: bare gRPC echo chains on loopback (``chain.Chain``), measured like a case.

Each service of a chain is its own process with one ``grpc.aio`` server answering every call
with a fixed reply of the chain's size; the front process (the router's place) makes the
chain's calls for each client call. Payloads are raw bytes (no protobuf work), so a chain is
the floor its shape of gRPC calls costs on this machine.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from cachemesh.loadtest.stats import latency_summary
from services.tools.bench.gateway.chain import Call, Chain

SERVICE = "cachemesh.bench.Echo"
FRONT = "Front"
_WARMUP_CALLS = 20


def _identity(data: bytes) -> bytes:
    return data


def _unary(reply: bytes) -> Callable[[bytes, Any], Awaitable[bytes]]:
    async def answer(request: bytes, context: Any) -> bytes:
        return reply

    return answer


def _stream(reply: bytes, count: int) -> Callable[[bytes, Any], AsyncIterator[bytes]]:
    async def answer(request: bytes, context: Any) -> AsyncIterator[bytes]:
        for _ in range(count):
            yield reply

    return answer


def _leaf_handler(calls: list[Call]) -> grpc.GenericRpcHandler:
    methods: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for call in calls:
        reply = b"y" * call.reply_bytes
        methods[call.method] = (
            grpc.unary_stream_rpc_method_handler(_stream(reply, call.replies), _identity, _identity)
            if call.replies > 1
            else grpc.unary_unary_rpc_method_handler(_unary(reply), _identity, _identity)
        )
    return grpc.method_handlers_generic_handler(SERVICE, methods)


class _Front:
    """The router's place: for each client call, the chain's calls, then the reply."""

    def __init__(self, chain: Chain, addresses: dict[str, str]) -> None:
        self._chain = chain
        self._reply = b"z" * chain.reply_bytes
        self._channels = {s: grpc.aio.insecure_channel(a) for s, a in addresses.items()}
        self._payloads = {c.method: b"x" * c.request_bytes for c in chain.calls()}

    async def answer(self, request: bytes, context: Any) -> bytes:
        for step in self._chain.steps:
            if len(step) == 1:
                await self._call(step[0])
            else:
                await asyncio.gather(*(self._call(c) for c in step))
        return self._reply

    async def _call(self, call: Call) -> None:
        channel = self._channels[call.service]
        path = f"/{SERVICE}/{call.method}"
        payload = self._payloads[call.method]
        if call.replies == 1 and not call.during:
            await channel.unary_unary(path, _identity, _identity)(payload)
            return
        stream = channel.unary_stream(path, _identity, _identity)(payload)
        await stream.read()
        for inner in call.during:
            await self._call(inner)
        while await stream.read() is not grpc.aio.EOF:
            pass

    def handler(self) -> grpc.GenericRpcHandler:
        method = grpc.unary_unary_rpc_method_handler(self.answer, _identity, _identity)
        return grpc.method_handlers_generic_handler(SERVICE, {FRONT: method})


async def _serve(
    chain: Chain, service: str | None, addresses: dict[str, str], ports: mp.Queue[int],
    stop: Any,
) -> None:  # fmt: skip
    """One process of the chain: ``service``'s leaf, or the front when ``service`` is None."""
    server = grpc.aio.server()
    if service is None:
        server.add_generic_rpc_handlers((_Front(chain, addresses).handler(),))
    else:
        server.add_generic_rpc_handlers(
            (_leaf_handler([c for c in chain.calls() if c.service == service]),)
        )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    ports.put(port)
    await asyncio.to_thread(stop.wait)  # the parent's multiprocessing Event
    await server.stop(0)


def _process(
    chain: Chain, service: str | None, addresses: dict[str, str], ports: mp.Queue[int],
    stop: Any,
) -> None:  # fmt: skip
    asyncio.run(_serve(chain, service, addresses, ports, stop))


@dataclass(frozen=True)
class EchoRun:
    """One run of a chain at one level: each call's latency (seconds) and the run's wall."""

    concurrency: int
    latencies: list[float]
    wall_s: float


async def _load(address: str, chain: Chain, requests: int, concurrency: int) -> EchoRun:
    payload = b"x" * chain.request_bytes
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(f"/{SERVICE}/{FRONT}", _identity, _identity)
        for _ in range(_WARMUP_CALLS):  # warm the connections along the chain
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
        return EchoRun(concurrency, latencies, time.perf_counter() - started)


def echo_row(runs: Sequence[EchoRun]) -> dict[str, Any]:
    """One level's row over ``runs`` of it (their calls pooled, their walls added)."""
    if not runs or len({r.concurrency for r in runs}) != 1:
        raise ValueError("echo_row pools one or more runs of the same level")
    latencies = [x for r in runs for x in r.latencies]
    wall = sum(r.wall_s for r in runs)
    return {
        "concurrency": runs[0].concurrency,
        "throughput_rps": round(len(latencies) / wall, 1),
        "latency_ms": latency_summary(latencies),
        "runs": len(runs),
    }


class RunningChain:
    """A chain's processes, started on entering and stopped on leaving, so that the bench can
    measure it between the runs of the case it is the reference of (both then see the
    machine's speed of that moment; a shared machine drifts by a third within an hour)."""

    def __init__(self, chain: Chain) -> None:
        self.chain = chain
        self._started: list[tuple[Any, Any]] = []  # (process, its stop event), callees first
        self._front = ""

    def __enter__(self) -> RunningChain:
        ctx = mp.get_context("spawn")
        ports: mp.Queue[int] = ctx.Queue()
        addresses: dict[str, str] = {}
        try:
            for service in [*self.chain.services(), None]:
                stop = ctx.Event()
                process = ctx.Process(
                    target=_process,
                    args=(self.chain, service, dict(addresses), ports, stop),
                    daemon=True,
                )
                process.start()
                self._started.append((process, stop))
                address = f"127.0.0.1:{ports.get(timeout=60)}"
                if service is not None:
                    addresses[service] = address
                else:
                    self._front = address
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()

    @property
    def front_pid(self) -> int:
        """The front's process id (the router's place; started last), once entered."""
        if not self._started:
            raise RuntimeError("the chain is not running")
        pid: int = self._started[-1][0].pid
        return pid

    def run(self, level: int, requests: int) -> EchoRun:
        """``requests`` calls with ``level`` of them in flight."""
        return asyncio.run(_load(self._front, self.chain, requests, level))

    def _stop(self) -> None:
        for process, stop in reversed(self._started):  # the front before the services it calls
            stop.set()
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
        self._started = []


def reference(
    chain: Chain, requests: int, measured: str, levels: list[dict[str, Any]]
) -> dict[str, Any]:
    """A reference as the report holds it: the chain, its calls a level, when it was measured
    and its rows (``echo_row``)."""
    return {
        "chain": chain.describe(),
        "requests_per_level": requests,
        "measured": measured,
        "levels": levels,
    }


def chain_reference(chain: Chain, levels: tuple[int, ...], requests: int) -> dict[str, Any]:
    """``chain`` measured at each level of in-flight calls, ``requests`` calls a level, on its
    own (the references the bench does not interleave with their case run after the cases)."""
    with RunningChain(chain) as running:
        rows = [echo_row([running.run(level, requests)]) for level in levels]
    return reference(chain, requests, "after the cases", rows)
