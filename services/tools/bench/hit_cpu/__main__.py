"""CPU per exact L1 hit, service by service: what metrics, logs and tracing cost a request.

Starts a stack of its own (free loopback ports, a run dir under ``<root>/.run``, the
simulator's sleeps at 0, no trace export unless ``--traced``: then every stack exports its
spans over OTLP to one real receiver in a process of its own, as ``make bench`` does), asks
one question once (a miss that stores it), then asks it ``--requests`` more times at
``--concurrency`` in flight (each an exact hit: one Lookup), reading every service's utime +
stime from ``/proc/<pid>/stat`` around those hits; repeats it ``--rounds`` times and writes
the per-round figures and their median.

``--root`` runs another checkout's services with this one's runner; ``--compare`` starts a
second checkout's stack beside the first and alternates their rounds (A B B A ...), so a
load from elsewhere on a shared machine weighs on both alike (a before/after: ``git archive
main | tar -x -C /tmp/base`` then ``--compare /tmp/base``). Timing is written to the report,
never asserted.

``--miss`` sends ``make bench``'s agent misses instead (case (c): tau-bench airline turns of
about 15 KB, model ``auto``, each in a cache namespace of its own, so each goes through every
layer: Lookup, Plan, Generate, two Commits, Store), ``--requests`` of them a round at
``--concurrency`` in flight; the figures are then CPU per miss. Each round draws its own turns
(``cases.agent_seed``): the same turns in every round were L1 misses still, but semantic-cache's
CPU for them fell from 19.5 ms a miss in the first round to 5.5-6.8 in the next three (one
stack, 1 in flight; drawn anew, 18.3-24.0 in every round). ``--floor`` also measures, in
as many rounds, the front of ``make bench``'s echo chain of the case (the router's calls with
raw bytes and nothing else): the gRPC floor under the router's figure, on this machine now.

    .venv/bin/python -m services.tools.bench.hit_cpu --compare /tmp/base --rounds 8
    .venv/bin/python -m services.tools.bench.hit_cpu --miss --requests 300 --concurrency 32
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cachemesh import AsyncClient, build_request
from cachemesh._argv import Parser
from cachemesh.v1 import gateway_pb2 as pb
from services.tools.arg_checks import at_least
from services.tools.bench.gateway import cases
from services.tools.bench.gateway.chain import Chain, miss_chain, two_hop
from services.tools.bench.gateway.cpu import (
    CpuProbe,
    StatReader,
    clock_ticks_per_s,
    per_request,
    read_proc_stat,
    ticks_between,
)
from services.tools.bench.gateway.echo import RunningChain
from services.tools.bench.gateway.run import TWO_HOP_PAYLOAD_BYTES
from services.tools.bench.gateway.sink_process import SinkProcess
from services.tools.bench.gateway.stacks import traces_to
from services.tools.keys import ensure_keys
from services.tools.out_path import refuse_unwritable
from services.tools.stack.lifecycle import Stack

QUESTION = "How do I reset my password on the billing portal?"


async def _hits(
    target: str, key: str, requests: int, concurrency: int, measure_from: Callable[[], None]
) -> int:
    """``requests`` exact hits at ``concurrency`` in flight, after a miss that stores the
    question, half a second for its Store, and one warm hit: ``measure_from`` is called then,
    right before the measured hits (the miss's model call, prefix-cache's commits and the
    embedding of its Store, and the idle half second, are not a hit's)."""
    namespace = f"hit-cpu-{time.time_ns()}"  # a fresh one a round: its first ask is a miss
    request = build_request(QUESTION, model="sim-small", max_tokens=256, namespace=namespace)
    async with AsyncClient(target, api_key=key) as client:
        first = await client.complete(request)
        if first.served_by != pb.LAYER_MODEL:
            raise RuntimeError(f"the first ask was not a miss: {pb.Layer.Name(first.served_by)}")
        await asyncio.sleep(0.5)  # its Store lands (the answer does not wait for it)
        await client.complete(request)  # warm: the first hit
        measure_from()
        left = requests

        async def worker() -> int:
            nonlocal left
            served = 0
            while left > 0:
                left -= 1
                response = await client.complete(request)
                if response.served_by != pb.LAYER_SEMANTIC_CACHE or not response.semantic.exact:
                    raise RuntimeError("a repeat was not an exact L1 hit")
                served += 1
            return served

        return sum(await asyncio.gather(*(worker() for _ in range(concurrency))))


async def _misses(
    target: str,
    key: str,
    requests: int,
    concurrency: int,
    measure_from: Callable[[], None],
    data_dir: Path,
    round_number: int,
) -> int:
    """``requests`` agent misses (``make bench``'s case (c): tau-bench airline turns, model
    ``auto``, each in a cache namespace of its own) at ``concurrency`` in flight; a round's
    namespace is fresh, so each is an L1 miss that goes through every layer, and its turns its
    own (``cases.agent_seed``: as make bench's repeat n of case (c), the same for every
    stack, so stacks compared meet the same turns)."""
    namespace = f"miss-cpu-{time.time_ns()}"
    seed = cases.agent_seed(concurrency, round_number)
    items = cases.agent_misses(data_dir, namespace, requests, seed=seed)
    async with AsyncClient(target, api_key=key) as client:
        measure_from()
        pending = iter(items)

        async def worker() -> int:
            served = 0
            for item in pending:
                response = await client.complete(item.request)
                if response.served_by == pb.LAYER_SEMANTIC_CACHE:
                    raise RuntimeError("an agent miss was served by L1")
                served += 1
            return served

        return sum(await asyncio.gather(*(worker() for _ in range(concurrency))))


@contextmanager
def _stack(root: Path, name: str, extra: dict[str, str]) -> Iterator[tuple[Stack, CpuProbe, str]]:
    run_dir = root / ".run" / f"bench-hit-cpu-{name}"
    keys = ensure_keys(run_dir)
    settings = {"SIM_TIME_SCALE": "0", "OTEL_TRACES_EXPORTER": "none", **extra}
    stack = Stack.on_free_ports(root, run_dir, settings, out=sys.stderr)
    stack.start()
    try:
        pids = {r.service.name: r.pid for r in stack.running()}
        probe = CpuProbe(pids, read_proc_stat, clock_ticks_per_s())
        yield stack, probe, keys.api_keys["tenant-a"]
    finally:
        stack.stop()


def _round(
    stack: Stack,
    probe: CpuProbe,
    key: str,
    requests: int,
    concurrency: int,
    miss: Path | None = None,
    round_number: int = 0,
) -> dict[str, Any]:
    """CPU and req/s of the measured hits only (``_hits``' ``measure_from``): before, the
    round's miss and its idle half second were counted as two more hits, which put 2,000
    hits at 8 in flight at 389-488 req/s and the router's CPU a hit above its own. ``miss``:
    the data directory of agent misses (``_misses``, the turns of ``round_number``) to send
    instead of hits."""
    mark: dict[str, Any] = {}

    def measure_from() -> None:
        mark["cpu"], mark["at"] = probe.sample(), time.monotonic()

    if miss is None:
        load = _hits(stack.router_address, key, requests, concurrency, measure_from)
    else:
        load = _misses(
            stack.router_address, key, requests, concurrency, measure_from, miss, round_number
        )
    served = asyncio.run(load)
    after, wall = probe.sample(), time.monotonic() - mark["at"]
    figures = per_request(ticks_between(mark["cpu"], after), served, probe.ticks_per_s)
    figures["requests_per_s"] = round(served / wall, 1) if wall > 0 else None
    return figures


def measure(
    roots: dict[str, Path],
    requests: int,
    concurrency: int,
    rounds: int,
    settings: dict[str, dict[str, str]] | None = None,
    miss: Path | None = None,
) -> dict[str, Any]:
    """Each root's stack (with its ``settings``), all up at once, measured in alternating
    rounds (A B B A ...), so that a load on the machine from elsewhere weighs on both alike."""
    settings = settings or {}
    with contextlib.ExitStack() as up:
        stacks = {
            name: up.enter_context(_stack(root, name, settings.get(name, {})))
            for name, root in roots.items()
        }
        per_round: dict[str, list[dict[str, Any]]] = {name: [] for name in roots}
        order = list(roots)
        for number in range(rounds):
            for name in order if number % 2 == 0 else order[::-1]:
                figures = _round(*stacks[name], requests, concurrency, miss, number)
                per_round[name].append(figures)
                router = figures["ms_per_request"]["router"]
                print(f"round {number + 1} {name}: router {router} ms a request", file=sys.stderr)
    report: dict[str, Any] = {"requests": requests, "concurrency": concurrency, "stacks": {}}
    if len(per_round) == 2:  # each round's ratio: the two stacks measured side by side
        mine, theirs = ([f["ms_per_request"]["router"] for f in r] for r in per_round.values())
        ratios = [a / b for a, b in zip(mine, theirs, strict=True) if b]
        report["router_ratio_per_round"] = [round(r, 3) for r in ratios]
        report["router_ratio_median"] = round(statistics.median(ratios), 3)
        report["router_ratio_above_1"] = sum(r > 1 for r in ratios)
    for name, measured in per_round.items():
        routers: list[float] = [f["ms_per_request"]["router"] for f in measured]
        report["stacks"][name] = {
            "root": str(roots[name]),
            "router_ms_per_hit": routers,
            "router_ms_per_hit_median": round(statistics.median(routers), 3),
            "rounds": measured,
        }
    return report


def _chain(miss: Path | None, requests: int) -> Chain:
    """The echo chain of the case: ``make bench``'s reference shape (the two hops of a hit,
    or the six calls of the agent miss of the median size)."""
    if miss is None:
        return two_hop(TWO_HOP_PAYLOAD_BYTES)
    agent = cases.agent_misses(miss, "shape", requests, seed=1)
    return miss_chain("agent", [item.request for item in agent])


def floor(
    chain: Chain, requests: int, concurrency: int, rounds: int, read: StatReader = read_proc_stat
) -> dict[str, Any]:
    """The CPU per request of the echo chain's front (``echo._Front``: the router's place, the
    same gRPC calls with raw bytes and no work of its own), ``rounds`` runs of ``requests``:
    the floor the router's CPU per request stands on, measured now on this machine."""
    ticks_per_s = clock_ticks_per_s()
    with RunningChain(chain) as running:
        probe = CpuProbe({"front": running.front_pid}, read, ticks_per_s)
        running.run(concurrency, min(requests, 200))  # warm
        spent = []
        for _ in range(rounds):
            before = probe.sample()
            running.run(concurrency, requests)
            ticks = ticks_between(before, probe.sample())
            spent.append(per_request(ticks, requests, ticks_per_s)["ms_per_request"]["front"])
    return {
        "chain": chain.name,
        "front_ms_per_request": spent,
        "front_ms_per_request_median": round(statistics.median(spent), 3),
    }


def main() -> None:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="the checkout to run")
    parser.add_argument(
        "--compare", type=Path, default=None, help="another checkout, measured in turns with it"
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting of this checkout's stack only (e.g. CACHEMESH_LOG_LEVEL=WARNING)",
    )
    parser.add_argument(
        "--traced",
        action="store_true",
        help="every stack exports its spans over OTLP to one real receiver (its own process)",
    )
    parser.add_argument(
        "--miss",
        action="store_true",
        help="agent misses (make bench's case (c)) instead of exact hits",
    )
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="the data (default: <root>/../shared/data)"
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also the CPU per request of make bench's echo chain of the case (the router's "
        "calls with nothing else): what the router's figure stands on",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    refuse_unwritable(parser, args.out)  # before the run, not after it
    at_least(parser, 1, requests=args.requests, concurrency=args.concurrency, rounds=args.rounds)
    roots = {"this": args.root.resolve()}
    if args.compare is not None:
        roots["compared"] = args.compare.resolve()
    own: dict[str, str] = {}
    for item in args.set:  # a ValueError traceback (dict of a one-piece split) before
        name, equals, value = item.partition("=")
        if not name or not equals:
            parser.error(f"--set expects NAME=VALUE, got {item!r}")
        own[name] = value
    with contextlib.ExitStack() as receiver:
        shared: dict[str, str] = {}
        if args.traced:
            sink = SinkProcess()
            shared = traces_to(sink.start())
            receiver.callback(sink.stop)
        settings = {name: {**shared, **(own if name == "this" else {})} for name in roots}
        data_dir = args.data_dir or roots["this"].parent / "shared" / "data"
        miss = data_dir if args.miss else None
        report = measure(roots, args.requests, args.concurrency, args.rounds, settings, miss)
    if args.floor:
        chain = _chain(miss, args.requests)
        report["floor"] = floor(chain, args.requests, args.concurrency, args.rounds)
        mine = report["stacks"]["this"]["router_ms_per_hit_median"]
        report["floor"]["router_over_floor"] = round(
            mine / report["floor"]["front_ms_per_request_median"], 3
        )
    report["settings"] = own
    report["traced"] = args.traced
    report["case"] = "agent miss" if args.miss else "exact hit"
    text = json.dumps(report, indent=2)
    if "router_ratio_median" in report:
        print(
            f"router CPU per {report['case']}, this / compared: "
            f"median {report['router_ratio_median']} over {args.rounds} rounds "
            f"({report['router_ratio_above_1']} above 1)",
            file=sys.stderr,
        )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
