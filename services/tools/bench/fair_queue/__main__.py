"""Tenant A's latency while tenant B floods sim-small: a stack of its own on free ports.

    python -m services.tools.bench.fair_queue [--flood 20] [--requests 20]

Tenant A asks short questions one after another (sim-small, 16 tokens) alone, then while
tenant B keeps ``--flood`` prompts of about 1,200 words in flight on the same model (one
replica serves sim-small: every prompt of B's queues for its prefill there). It prints A's
p50 and p90 latency (the whole Complete call) in each phase. Every prompt is new (no cache
answers it). A measurement for a report, not a test: the figures depend on the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import grpc

import cachemesh
from cachemesh import build_request
from cachemesh._argv import Parser
from cachemesh.envfile import read_env_file
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import gateway_pb2_grpc
from services.model.settings import MAX_TIME_SCALE
from services.tools.arg_checks import within
from services.tools.stack.lifecycle import Stack

ROOT = Path(__file__).resolve().parents[4]
WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india")


def _long_prompt(rng: random.Random) -> str:
    words = " ".join(f"{rng.choice(WORDS)}{rng.randrange(10_000)}" for _ in range(1_200))
    return f"{uuid.uuid4().hex} summarise: {words}"


async def _flood(stub: gateway_pb2_grpc.GatewayAsyncStub, key: str, stop: asyncio.Event) -> int:
    rng, sent = random.Random(), 0
    metadata = (("authorization", f"Bearer {key}"),)
    while not stop.is_set():
        request = build_request(
            _long_prompt(rng), model="sim-small", max_tokens=16, semantic=pb.SEMANTIC_MODE_BYPASS
        )
        with contextlib.suppress(grpc.aio.AioRpcError):  # counted as sent all the same
            await stub.Complete(request, metadata=metadata, timeout=120)
        sent += 1
    return sent


async def _latencies(stub: gateway_pb2_grpc.GatewayAsyncStub, key: str, count: int) -> list[float]:
    metadata = (("authorization", f"Bearer {key}"),)
    out: list[float] = []
    for _ in range(count):
        request = build_request(
            f"{uuid.uuid4().hex}: say hello", model="sim-small", max_tokens=16,
            semantic=pb.SEMANTIC_MODE_BYPASS,
        )  # fmt: skip
        began = time.perf_counter()
        await stub.Complete(request, metadata=metadata, timeout=120)
        out.append(time.perf_counter() - began)
    return out


def _figures(name: str, values: list[float]) -> str:
    p50 = statistics.median(values) * 1000
    p90 = statistics.quantiles(values, n=10)[-1] * 1000
    return f"{name}: p50 {p50:,.0f} ms, p90 {p90:,.0f} ms ({len(values)} requests)"


async def _run(target: str, keys: dict[str, str], flood: int, requests: int) -> None:
    options = cachemesh.channel_options(max_attempts=1)
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        await _latencies(stub, keys["a"], 3)  # warm-up
        print(_figures("A alone", await _latencies(stub, keys["a"], requests)), flush=True)
        stop = asyncio.Event()
        workers = [asyncio.ensure_future(_flood(stub, keys["b"], stop)) for _ in range(flood)]
        await asyncio.sleep(2.0)  # B's queue fills
        a = await _latencies(stub, keys["a"], requests)
        stop.set()
        sent = sum(await asyncio.gather(*workers))
        print(_figures(f"A with B's {flood} in flight", a) + f"; B sent {sent}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--flood", type=int, default=20)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help=f"the model service's SIM_TIME_SCALE, 0 (no sleeps) to {MAX_TIME_SCALE:g}",
    )
    args = parser.parse_args(argv)
    # before the stack starts: a p90 needs two latencies (one ended in a StatisticsError
    # traceback once the stack had run both phases)
    if args.requests < 2 or args.flood < 1:
        parser.error("--requests must be >= 2 (a p90 needs two) and --flood >= 1")
    # the model service's own bounds, here: it refused -1 only after the stack had started
    within(parser, 0.0, MAX_TIME_SCALE, time_scale=args.time_scale)
    with tempfile.TemporaryDirectory() as run_dir:
        stack = Stack.on_free_ports(
            ROOT,
            Path(run_dir),
            {"SIM_TIME_SCALE": repr(args.time_scale), "OTEL_TRACES_EXPORTER": "none"},
        )
        try:
            stack.start(timeout_s=240)
            demo = read_env_file(Path(run_dir) / "demo-keys.env")
            keys = {"a": demo["CACHEMESH_KEY_A"], "b": demo["CACHEMESH_KEY_B"]}
            asyncio.run(_run(stack.router_address, keys, args.flood, args.requests))
        finally:
            stack.stop()


if __name__ == "__main__":
    main()
