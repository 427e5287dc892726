"""Sends a planned list of requests: closed loop (N in flight) or open loop (Poisson arrivals).

``run_plan`` runs in one process; ``run_processes`` splits the plan over several spawned
processes (each with its own event loop and channel, so the client is not the bottleneck) and
merges their samples. Every run stops at the end of its plan or at its deadline, whichever
comes first; requests still in flight at the deadline are cancelled and counted as errors
(``CUT_AT_DEADLINE``, their latency the time they had run): a slow tail is never dropped.
"""

from __future__ import annotations

import asyncio
import logging
import math
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
from cachemesh._tls import Tls
from cachemesh.loadtest.samples import CUT, Sample, from_error, from_response
from cachemesh.loadtest.workloads import Item
from cachemesh.v1 import gateway_pb2 as pb

Mode = Literal["closed", "open"]
MAX_OPEN_IN_FLIGHT = 2048  # an open loop that falls this far behind stops adding requests
log = logging.getLogger("cachemesh.loadtest")


@dataclass(frozen=True)
class LoadShape:
    mode: Mode
    concurrency: int  # closed: requests in flight
    rate_rps: float  # open: mean arrival rate (Poisson)
    duration_s: float  # hard bound on the measured phase
    stream: bool
    timeout_s: float = 120.0
    seed: int = 7
    tls: Tls | None = None  # every channel of the run, each client process's too


async def _send(
    clients: dict[str, AsyncClient], item: Item, stream: bool, due: float, warmup: bool,
    index: int, samples: list[Sample],
) -> None:  # fmt: skip
    """Sends ``item`` and appends its sample to ``samples``: its answer, its error (any
    exception of the client, named by its gRPC status or its type), or, cancelled at the
    run's deadline, ``CUT_AT_DEADLINE``."""
    client = clients[item.tenant]
    started = time.perf_counter()
    # when it was due, on the monotonic clock (a wall-clock step mid-run moves no figure;
    # system-wide on Linux: the samples of spawned processes compare)
    began = time.monotonic() - (started - due if due else 0.0)
    origin = due or started

    def failed(code: str) -> Sample:
        latency = time.perf_counter() - origin
        return from_error(item, code, began, latency, warmup=warmup, index=index)

    try:
        if not stream:
            response = await client.complete(item.request)
            latency = time.perf_counter() - origin
            sample = from_response(item, response, began, latency, warmup=warmup, index=index)
            samples.append(sample)
            return
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
            samples.append(failed("NO_END"))
            return
        end.served_by = end.served_by or head.served_by  # the start's layer is a guess
        latency = time.perf_counter() - origin
        samples.append(from_response(item, end, began, latency, ttft, warmup=warmup, index=index))
    except CachemeshError as error:
        samples.append(failed(error.code.name))
    except asyncio.CancelledError:
        samples.append(failed(CUT))
        raise
    except Exception as error:  # the client's own fault (e.g. a key grpc refuses to send)
        samples.append(failed(type(error).__name__))


async def _closed(
    clients: dict[str, AsyncClient], plan: Sequence[Item], shape: LoadShape, deadline: float,
    warmup: bool, tick: Callable[[], None], first: int, stride: int,
) -> list[Sample]:  # fmt: skip
    samples: list[Sample] = []
    queue = enumerate(plan)

    async def worker() -> None:
        for index, item in queue:
            if time.perf_counter() >= deadline:
                return
            await _send(clients, item, shape.stream, 0.0, warmup, first + index * stride, samples)
            tick()

    workers = [asyncio.create_task(worker()) for _ in range(max(1, shape.concurrency))]
    await _bounded(workers, deadline)
    return samples


async def _open(
    clients: dict[str, AsyncClient], plan: Sequence[Item], shape: LoadShape, deadline: float,
    seed: int, tick: Callable[[], None], first: int, stride: int,
) -> list[Sample]:  # fmt: skip
    samples: list[Sample] = []
    rng = random.Random(seed)
    tasks: set[asyncio.Task[None]] = set()

    async def one(index: int, item: Item, due: float) -> None:
        await _send(clients, item, shape.stream, due, False, first + index * stride, samples)
        tick()

    due = time.perf_counter()
    for index, item in enumerate(plan):
        due += rng.expovariate(shape.rate_rps)
        if due >= deadline:
            break
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        if len(tasks) >= MAX_OPEN_IN_FLIGHT:
            due_still = min(len(plan) - index, math.ceil(shape.rate_rps * (deadline - due)))
            log.warning(
                "the open loop has %d requests in flight (the Gateway answers slower than "
                "%.1f/s): about %d more that were due before the deadline are not sent, and "
                "the report counts only what was",
                MAX_OPEN_IN_FLIGHT, shape.rate_rps, due_still,
            )  # fmt: skip
            break
        task = asyncio.create_task(one(index, item, due))
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
    first: int = 0, stride: int = 1,
) -> list[Sample]:  # fmt: skip
    """Runs ``plan`` in this process and returns its samples (warm-up ones marked). ``plan``
    is every ``stride``-th item of the whole plan from ``first`` (a sample's ``index`` is its
    place in the whole plan)."""
    clients = {
        t: AsyncClient(target, api_key=k, tls=shape.tls, timeout_s=shape.timeout_s)
        for t, k in keys.items()
    }
    try:
        deadline = time.perf_counter() + shape.duration_s
        if shape.mode == "open" and not warmup:
            return await _open(clients, plan, shape, deadline, seed, tick, first, stride)
        return await _closed(clients, plan, shape, deadline, warmup, tick, first, stride)
    finally:
        for client in clients.values():
            await client.close()


def _child(
    target: str, keys: dict[str, str], plan: list[Item], shape: LoadShape, seed: int,
    counter: Synchronized[int], out: mp.Queue[list[Sample]], first: int, stride: int,
) -> None:  # fmt: skip
    def tick() -> None:
        with counter.get_lock():
            counter.value += 1

    run = run_plan(target, keys, plan, shape, seed=seed, tick=tick, first=first, stride=stride)
    out.put(asyncio.run(run))


def run_processes(
    target: str, keys: dict[str, str], plan: Sequence[Item], shape: LoadShape, processes: int,
    progress: Callable[[int], None],
) -> list[Sample]:  # fmt: skip
    """Splits the plan round-robin over ``processes``; concurrency and rate are split too,
    exactly (the first ``concurrency % processes`` processes keep one more request in flight;
    a closed loop needs ``processes <= concurrency``)."""
    if shape.mode == "closed" and processes > shape.concurrency:
        raise ValueError(f"{processes} processes cannot share {shape.concurrency} in flight")
    ctx = mp.get_context("spawn")
    counter: Synchronized[int] = ctx.Value("i", 0)
    out: mp.Queue[list[Sample]] = ctx.Queue()
    whole, extra = divmod(shape.concurrency, processes)
    rate = shape.rate_rps / processes
    children = []
    for p in range(processes):
        share = replace(shape, concurrency=whole + (p < extra), rate_rps=rate)
        part = list(plan[p::processes])
        args = (target, keys, part, share, shape.seed + p, counter, out, p, processes)
        children.append(ctx.Process(target=_child, args=args, daemon=True))
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
