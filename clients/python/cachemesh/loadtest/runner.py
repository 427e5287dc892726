"""Sends a planned list of requests: closed loop (N in flight) or open loop (Poisson arrivals).

``run_plan`` runs in one process; ``run_processes`` splits the plan over several spawned
processes (each with its own event loop and channel, so the client is not the bottleneck) and
merges their samples. Every run stops at the end of its plan or at its deadline, whichever
comes first; requests still in flight at the deadline are cancelled and not counted.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import queue
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from multiprocessing.sharedctypes import Synchronized
from typing import Literal

from cachemesh._client import AsyncClient
from cachemesh._errors import CachemeshError
from cachemesh.loadtest.samples import Sample, from_error, from_response
from cachemesh.loadtest.workloads import Item
from cachemesh.v1 import gateway_pb2 as pb

Mode = Literal["closed", "open"]
MAX_OPEN_IN_FLIGHT = 2048  # an open loop that falls this far behind stops adding requests


@dataclass(frozen=True)
class LoadShape:
    mode: Mode
    concurrency: int  # closed: requests in flight
    rate_rps: float  # open: mean arrival rate (Poisson)
    duration_s: float  # hard bound on the measured phase
    stream: bool
    timeout_s: float = 120.0
    seed: int = 7


async def _send(
    clients: dict[str, AsyncClient], item: Item, stream: bool, due: float, warmup: bool
) -> Sample:
    client = clients[item.tenant]
    started = time.perf_counter()
    wall = time.time() - (started - due if due else 0.0)
    origin = due or started
    try:
        if not stream:
            response = await client.complete(item.request)
            return from_response(item, response, wall, time.perf_counter() - origin, warmup=warmup)
        ttft: float | None = None
        head, end = pb.CompleteResponse(), None
        async for chunk in client.stream(item.request):
            part = chunk.WhichOneof("part")
            if part == "start":
                head.CopyFrom(chunk.start)
            elif part == "delta" and ttft is None:
                ttft = time.perf_counter() - origin
            elif part == "end":
                end = chunk.end
        if end is None:
            return from_error(item, "NO_END", wall, time.perf_counter() - origin, warmup=warmup)
        end.served_by = head.served_by or end.served_by
        latency = time.perf_counter() - origin
        return from_response(item, end, wall, latency, ttft, warmup=warmup)
    except CachemeshError as error:
        return from_error(item, error.code.name, wall, time.perf_counter() - origin, warmup=warmup)


async def _closed(
    clients: dict[str, AsyncClient], plan: Sequence[Item], shape: LoadShape, deadline: float,
    warmup: bool, tick: Callable[[], None],
) -> list[Sample]:  # fmt: skip
    samples: list[Sample] = []
    queue = iter(plan)

    async def worker() -> None:
        for item in queue:
            if time.perf_counter() >= deadline:
                return
            samples.append(await _send(clients, item, shape.stream, 0.0, warmup))
            tick()

    workers = [asyncio.create_task(worker()) for _ in range(max(1, shape.concurrency))]
    await _bounded(workers, deadline)
    return samples


async def _open(
    clients: dict[str, AsyncClient], plan: Sequence[Item], shape: LoadShape, deadline: float,
    seed: int, tick: Callable[[], None],
) -> list[Sample]:  # fmt: skip
    samples: list[Sample] = []
    rng = random.Random(seed)
    tasks: set[asyncio.Task[None]] = set()

    async def one(item: Item, due: float) -> None:
        samples.append(await _send(clients, item, shape.stream, due, False))
        tick()

    due = time.perf_counter()
    for item in plan:
        due += rng.expovariate(shape.rate_rps)
        if due >= deadline:
            break
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        if len(tasks) >= MAX_OPEN_IN_FLIGHT:
            break
        task = asyncio.create_task(one(item, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await _bounded(list(tasks), deadline)
    return samples


async def _bounded(tasks: list[asyncio.Task[None]], deadline: float) -> None:
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter()))
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


async def run_plan(
    target: str, keys: dict[str, str], plan: Sequence[Item], shape: LoadShape, *,
    warmup: bool = False, seed: int = 0, tick: Callable[[], None] = lambda: None,
) -> list[Sample]:  # fmt: skip
    """Runs ``plan`` in this process and returns its samples (warm-up ones marked)."""
    clients = {
        t: AsyncClient(target, api_key=k, timeout_s=shape.timeout_s) for t, k in keys.items()
    }
    try:
        deadline = time.perf_counter() + shape.duration_s
        if shape.mode == "open" and not warmup:
            return await _open(clients, plan, shape, deadline, seed, tick)
        return await _closed(clients, plan, shape, deadline, warmup, tick)
    finally:
        for client in clients.values():
            await client.close()


def _child(
    target: str, keys: dict[str, str], plan: list[Item], shape: LoadShape, seed: int,
    counter: Synchronized[int], out: mp.Queue[list[Sample]],
) -> None:  # fmt: skip
    def tick() -> None:
        with counter.get_lock():
            counter.value += 1

    out.put(asyncio.run(run_plan(target, keys, plan, shape, seed=seed, tick=tick)))


def run_processes(
    target: str, keys: dict[str, str], plan: Sequence[Item], shape: LoadShape, processes: int,
    progress: Callable[[int], None],
) -> list[Sample]:  # fmt: skip
    """Splits the plan round-robin over ``processes``; concurrency and rate are split too."""
    ctx = mp.get_context("spawn")
    counter: Synchronized[int] = ctx.Value("i", 0)
    out: mp.Queue[list[Sample]] = ctx.Queue()
    share = replace(
        shape,
        concurrency=max(1, -(-shape.concurrency // processes)),
        rate_rps=shape.rate_rps / processes,
        duration_s=shape.duration_s,
    )
    children = [
        ctx.Process(
            target=_child,
            args=(target, keys, list(plan[p::processes]), share, shape.seed + p, counter, out),
            daemon=True,
        )
        for p in range(processes)
    ]
    for child in children:
        child.start()
    results: list[Sample] = []
    received = 0
    give_up = time.monotonic() + shape.duration_s + shape.timeout_s + 60
    while received < processes and time.monotonic() < give_up:
        progress(counter.value)
        try:
            results += out.get(timeout=0.2)
            received += 1
        except queue.Empty:  # keep drawing the progress bar
            continue
    for child in children:
        child.join(timeout=5)
        if child.is_alive():
            child.kill()
    if received < processes:
        raise RuntimeError(f"{processes - received} client processes did not report back")
    progress(counter.value)
    return results
