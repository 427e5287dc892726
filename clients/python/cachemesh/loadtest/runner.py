"""Sends a planned list of requests: closed loop (N in flight) or open loop (Poisson arrivals).

A session's items (an agent conversation's turns, ``Item.session``) are sent in the plan's
order, each after the previous one's answer (or error), never two at once: in the closed loop
a worker takes a whole session and works through it before its next, so N in flight are N
conversations (and stand-alone requests); in the open loop a session arrives as one request
does, its first turn then, each next turn on the previous one's answer.

``run_plan`` runs in one process; ``run_processes`` splits the plan over several spawned
processes (each with its own event loop and channel, so the client is not the bottleneck) and
merges their samples. Every run stops at the end of its plan or at its deadline, whichever
comes first: no request starts after the deadline (a conversation's next turn neither); those
in flight then have the shape's ``grace_s`` more to finish (k6's ``gracefulStop``, locust's
``--stop-timeout``), and those still running at its end are cancelled and counted apart
(``CUT_AT_DEADLINE``, their latency the time they had run: a slow tail is never dropped; the
run's own cut, not an error of the Gateway's). A
spawned process that dies before reporting is not waited for: its share of the plan is counted
as errors (``CLIENT_PROCESS_LOST``). Interrupted (Ctrl-C), a run stops sending, cancels what is
in flight (``INTERRUPTED``, their latency the time they had run) and raises ``Interrupted`` with
the samples so far; a second Ctrl-C stops at once (a plain KeyboardInterrupt).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import math
import multiprocessing as mp
import random
import signal
import threading
import time
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from multiprocessing.sharedctypes import Synchronized
from types import FrameType
from typing import Any, Literal

from cachemesh._client import AsyncClient
from cachemesh._errors import CachemeshError
from cachemesh._tls import Tls
from cachemesh.loadtest.samples import (
    CUT,
    ERROR,
    INTERRUPTED,
    LOST,
    Sample,
    from_error,
    from_response,
)
from cachemesh.loadtest.workloads import Item
from cachemesh.v1 import gateway_pb2 as pb

Mode = Literal["closed", "open"]
DEFAULT_STOP_GRACE_S = 30.0  # cachemesh-load's --stop-grace (k6's gracefulStop default)
MAX_OPEN_IN_FLIGHT = 2048  # an open loop that falls this far behind stops adding requests
log = logging.getLogger("cachemesh.loadtest")
# the task that runs the plan (run_plan's): its requests' tasks inherit it
_RUN: ContextVar[asyncio.Task[Any] | None] = ContextVar("cachemesh_loadtest_run", default=None)


class Interrupted(KeyboardInterrupt):
    """The run was interrupted (Ctrl-C): ``samples`` are those taken until then, the requests
    in flight counted as ``INTERRUPTED`` (a KeyboardInterrupt: a caller that does not look
    for it stops as on any Ctrl-C)."""

    def __init__(self, samples: list[Sample]) -> None:
        super().__init__("interrupted")
        self.samples = samples


def _interrupted() -> bool:
    """Whether this run's task was cancelled: asyncio.run does so at the first Ctrl-C (a client
    process's, at its parent's SIGTERM); the run's deadline cancels only its requests."""
    run = _RUN.get()
    return run is not None and run.cancelling() > 0


@dataclass(frozen=True)
class LoadShape:
    mode: Mode
    concurrency: int  # closed: requests in flight
    rate_rps: float  # open: mean arrival rate (Poisson)
    duration_s: float  # no request starts after it (the measured phase's bound)
    stream: bool
    timeout_s: float = 120.0
    seed: int = 7
    tls: Tls | None = None  # every channel of the run, each client process's too
    insecure: bool = False  # --insecure: plaintext to a target that is not loopback
    # after duration_s, the time the requests in flight then have to finish before they are
    # cut (CUT_AT_DEADLINE); 0: cut at once
    grace_s: float = 0.0


async def _send(
    clients: dict[str, AsyncClient], item: Item, stream: bool, due: float, warmup: bool,
    index: int, samples: list[Sample],
) -> None:  # fmt: skip
    """Sends ``item`` and appends its sample to ``samples``: its answer, its error (any
    exception of the client, named by its gRPC status or its type), or, cancelled at the end
    of the run's grace, ``CUT_AT_DEADLINE`` (``INTERRUPTED``: cancelled by a Ctrl-C)."""
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
        samples.append(failed(INTERRUPTED if _interrupted() else CUT))
        raise
    except Exception as error:  # the client's own fault (e.g. a key grpc refuses to send)
        samples.append(failed(type(error).__name__))


def sessions(plan: Sequence[Item]) -> list[list[int]]:
    """The plan's indices as the runner hands them out: each session's items together, in plan
    order, where its first item is; every item without a session on its own."""
    units: list[list[int]] = []
    started: dict[str, list[int]] = {}
    for index, item in enumerate(plan):
        if not item.session:
            units.append([index])
        elif item.session in started:
            started[item.session].append(index)
        else:
            started[item.session] = [index]
            units.append(started[item.session])
    return units


async def _closed(
    clients: dict[str, AsyncClient], plan: Sequence[Item], shape: LoadShape, deadline: float,
    warmup: bool, tick: Callable[[], None], places: Sequence[int],
) -> list[Sample]:  # fmt: skip
    samples: list[Sample] = []
    queue = iter(sessions(plan))

    async def worker() -> None:
        for unit in queue:  # a session's turns one after another, each on the previous answer
            for index in unit:
                if time.perf_counter() >= deadline:
                    return
                item, place = plan[index], places[index]
                await _send(clients, item, shape.stream, 0.0, warmup, place, samples)
                tick()

    workers = [asyncio.create_task(worker()) for _ in range(max(1, shape.concurrency))]
    await _bounded(workers, deadline + shape.grace_s)
    return samples


async def _open(
    clients: dict[str, AsyncClient], plan: Sequence[Item], shape: LoadShape, deadline: float,
    seed: int, tick: Callable[[], None], places: Sequence[int],
) -> list[Sample]:  # fmt: skip
    samples: list[Sample] = []
    rng = random.Random(seed)
    tasks: set[asyncio.Task[None]] = set()

    async def one(unit: list[int], due: float) -> None:
        for turn, index in enumerate(unit):  # a next turn is due at the previous answer
            if turn and time.perf_counter() >= deadline:  # none starts in the grace
                return
            await _send(clients, plan[index], shape.stream, due, False, places[index], samples)
            tick()
            due = 0.0

    due = time.perf_counter()
    units = sessions(plan)
    for number, unit in enumerate(units):
        due += rng.expovariate(shape.rate_rps)
        if due >= deadline:
            break
        try:
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
        except asyncio.CancelledError:  # interrupted: no more are sent
            break
        if len(tasks) >= MAX_OPEN_IN_FLIGHT:
            due_still = min(len(units) - number, math.ceil(shape.rate_rps * (deadline - due)))
            log.warning(
                "the open loop has %d requests in flight (the Gateway answers slower than "
                "%.1f/s): about %d more that were due before the deadline are not sent, and "
                "the report counts only what was",
                MAX_OPEN_IN_FLIGHT, shape.rate_rps, due_still,
            )  # fmt: skip
            break
        task = asyncio.create_task(one(unit, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await _bounded(list(tasks), deadline + shape.grace_s)
    return samples


async def _bounded(tasks: list[asyncio.Task[None]], deadline: float) -> None:
    """Waits for ``tasks`` until ``deadline`` (the run's, its grace added), then cancels those
    still running; the run
    interrupted (its task cancelled, before or while it waits), at once."""
    if not tasks:
        return
    pending = set(tasks)
    if not _interrupted():
        try:
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter()))
        except asyncio.CancelledError:  # interrupted: what is in flight is cut now
            pending = {task for task in tasks if not task.done()}
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)  # their samples taken (cancelled once only: not again)


async def run_plan(
    target: str, keys: dict[str, str], plan: Sequence[Item], shape: LoadShape, *,
    warmup: bool = False, seed: int = 0, tick: Callable[[], None] = lambda: None,
    places: Sequence[int] | None = None,
) -> list[Sample]:  # fmt: skip
    """Runs ``plan`` in this process and returns its samples (warm-up ones marked). ``places``
    are its items' places in the whole plan (a sample's ``index``; default: ``plan`` is the
    whole plan). Its task cancelled (asyncio.run's first Ctrl-C), it sends no more, cuts what
    is in flight and raises ``Interrupted`` with the samples."""
    _RUN.set(asyncio.current_task())
    clients = {
        t: AsyncClient(
            target, api_key=k, tls=shape.tls, timeout_s=shape.timeout_s, insecure=shape.insecure
        )
        for t, k in keys.items()
    }
    places = range(len(plan)) if places is None else places
    try:
        deadline = time.perf_counter() + shape.duration_s
        if shape.mode == "open" and not warmup:
            samples = await _open(clients, plan, shape, deadline, seed, tick, places)
        else:
            samples = await _closed(clients, plan, shape, deadline, warmup, tick, places)
    finally:
        for client in clients.values():
            await client.close()
    if _interrupted():
        raise Interrupted(samples)
    return samples


def _child(
    target: str, keys: dict[str, str], plan: list[Item], shape: LoadShape, seed: int,
    counter: Synchronized[int], out: Connection, over: ctypes.Array[ctypes.c_bool],
    places: list[int], process: int,
) -> None:  # fmt: skip
    """Sends ``plan``, the items at ``places`` of the whole plan (its samples' ``index``), and
    reports its samples on ``out``, its own pipe. Its parent decides when the run is
    interrupted: a Ctrl-C at a terminal reaches every process of the group, so this one
    ignores SIGINT and stops at its parent's SIGTERM instead, reporting what it has. It starts
    with both blocked (``run_processes``), so neither kills it before it can do so; its run
    over, it sets ``over[process]`` and ignores SIGTERM (the loop's handler goes with the
    loop): one then would kill it while it reports."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    def tick() -> None:
        with counter.get_lock():
            counter.value += 1

    async def run() -> list[Sample]:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        try:
            return await run_plan(target, keys, plan, shape, seed=seed, tick=tick, places=places)
        finally:  # held from now on, then ignored: the parent need not stop this one
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            over[process] = True

    try:
        samples = asyncio.run(run())
    except Interrupted as interrupted:
        samples = interrupted.samples
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # drops one held since the run was over
    out.send(samples)
    out.close()


def shares(units: Sequence[Sequence[int]], shape: LoadShape, processes: int) -> list[list[int]]:
    """The places of the plan each of ``processes`` sends, given its ``units`` (``sessions``:
    a conversation's turns stay together, in one process). A closed loop deals the units out
    slot by slot (unit ``u`` to the process that owns in-flight slot ``u % concurrency``;
    process ``p`` owns the slots ``s`` with ``s % processes == p``, as many as
    ``run_processes`` gives it), so a process's share is in proportion to its slots and all
    of them end together; an open loop splits its rate evenly, and its units too."""
    slots = shape.concurrency if shape.mode == "closed" else processes
    out: list[list[int]] = [[] for _ in range(processes)]
    for number, unit in enumerate(units):
        out[number % slots % processes].extend(unit)
    return [sorted(places) for places in out]


def run_processes(
    target: str, keys: dict[str, str], plan: Sequence[Item], shape: LoadShape, processes: int,
    progress: Callable[[int], None], warn: Callable[[str], None] = log.warning,
) -> list[Sample]:  # fmt: skip
    """Splits the plan over ``processes``, each session whole to one process, in proportion to
    each process's in-flight slots (``shares``); concurrency and rate are split too, exactly
    (the first ``concurrency % processes`` processes keep one more request in flight; a
    closed loop needs ``processes <= concurrency``). A process that exits without reporting
    (killed: the OOM killer) or has not reported by the run's end (duration, a request's
    timeout (or its grace), a minute) is not waited for: each request of its share is counted as
    ``CLIENT_PROCESS_LOST`` and ``warn`` names it (one killed halfway through its report
    too: each reports on its own pipe, so neither this process nor another waits for it). A
    Ctrl-C (SIGINT to this process) sends every process whose run is not over SIGTERM: each
    cuts what it has in flight and reports; then ``Interrupted`` is raised with every sample
    (a second Ctrl-C: a KeyboardInterrupt, now)."""
    if shape.mode == "closed" and processes > shape.concurrency:
        raise ValueError(f"{processes} processes cannot share {shape.concurrency} in flight")
    ctx = mp.get_context("spawn")
    counter: Synchronized[int] = ctx.Value("i", 0)
    over = ctx.RawArray(ctypes.c_bool, processes)  # whose run is over (set by that process)
    pipes = [ctx.Pipe(duplex=False) for _ in range(processes)]  # (read, write): a report each
    whole, extra = divmod(shape.concurrency, processes)
    rate = shape.rate_rps / processes
    children, split = [], shares(sessions(plan), shape, processes)
    for p, places in enumerate(split):
        share = replace(shape, concurrency=whole + (p < extra), rate_rps=rate)
        part = [plan[i] for i in places]
        args = (target, keys, part, share, shape.seed + p, counter, pipes[p][1], over, places, p)
        children.append(ctx.Process(target=_child, args=args, daemon=True))
    results: list[Sample] = []
    waiting = set(range(processes))  # neither reported nor lost
    lost: dict[int, str] = {}  # process -> how it was lost
    give_up = time.monotonic() + shape.duration_s + shape.grace_s + shape.timeout_s + 60
    interrupted = False

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        nonlocal interrupted
        if interrupted:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        interrupted = True

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if main else None
    try:
        # a child inherits the signal mask: it unblocks each signal once it handles it
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            for child in children:
                child.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            for _, write in pipes:  # each process's end is its own: it exits, the pipe ends
                write.close()
        reports: dict[object, int] = {pipes[p][0]: p for p in waiting}
        stopping = False
        while waiting:
            progress(counter.value)
            if interrupted and not stopping:  # each cuts what it has in flight and reports
                stopping = True
                for p in waiting:
                    if not over[p]:  # one whose run is over is reporting already
                        children[p].terminate()
                give_up = min(give_up, time.monotonic() + 15)  # they need not finish a request
            # 0.2 s at most: keep drawing the progress bar
            for ready in wait([pipes[p][0] for p in waiting], 0.2):
                p = reports[ready]
                try:
                    results += pipes[p][0].recv()
                except (EOFError, OSError):  # it exited (was killed) before or while reporting
                    children[p].join(5)
                    lost[p] = _ended(children[p].exitcode)
                waiting.discard(p)
            if waiting and time.monotonic() >= give_up:
                for p in waiting:
                    lost[p] = "had not reported its samples by the end of the run (stopped)"
                waiting.clear()
    finally:
        if main:
            signal.signal(signal.SIGINT, previous or signal.default_int_handler)
        for child in children:
            if child.pid is None:  # never started
                continue
            child.join(timeout=5)
            if child.is_alive():
                child.kill()
        for read, _ in pipes:
            read.close()
    for p, how in sorted(lost.items()):
        places = split[p]
        results += [Sample(plan[i].kind, ERROR, LOST, 0.0, 0.0, None, index=i) for i in places]
        warn(
            f"client process {p + 1} of {processes} (pid {children[p].pid}) {how}: its "
            f"{len(places)} planned requests are counted as errors "
            f"{LOST} (whether each was sent, answered or billed is unknown; the request log "
            "leaves them out)"
        )
    progress(counter.value)
    if interrupted:
        raise Interrupted(results)
    return results


def _ended(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name if -exitcode in signal.valid_signals() else "?"
        oom = ", as the OOM killer does" if exitcode == -signal.SIGKILL else ""
        return f"was killed by signal {-exitcode} ({name}{oom}) before reporting its samples"
    return f"exited with code {exitcode} before reporting its samples"
