"""What a key change costs the processes that check keys: a 10k-key file, 25 CreateKeys.

Two processes, as a router and an HTTP front on one host: the "router" makes 25 key changes
(each in a worker thread, as its Admin API does) while its event loop answers a stream of
requests that check a key; the "front" only answers such requests, from its own store of the
same file. A request's latency is the time from when it was due to when its key check returned
(the event loop's lag included: a re-read on the loop delays every request behind it).

    .venv/bin/python -m services.tools.bench.key_reload [--keys 10000] [--changes 25]
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from cachemesh._argv import Parser
from services.common.key_store import KeyStore
from services.common.keyfile import KeyFile, hash_key, issue
from services.tools.arg_checks import at_least

_EVERY_S = 0.002  # one request every 2 ms


def _write_keys(path: Path, count: int) -> str:
    records = [issue(f"tenant-{i % 50}", f"key {i}", 1_700_000_000.0)[0] for i in range(count)]
    record, key = issue("acme", "bench", 1_700_000_000.0)
    KeyFile(path).update(lambda _: [*records, record], create=True)
    assert record.sha256 == hash_key(key)
    return key


async def _requests(store: KeyStore, key: str, stop: asyncio.Event) -> list[float]:
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    due = loop.time()
    while not stop.is_set():
        due += _EVERY_S
        await asyncio.sleep(max(0.0, due - loop.time()))
        assert store.tenant_for(key) == "acme"
        latencies.append(loop.time() - due)
        due = max(due, loop.time() - _EVERY_S)  # no burst to catch up after a stall
    return latencies


async def _router(path: Path, key: str, changes: int, ready: Any, go: Any) -> dict[str, Any]:
    store = KeyStore.open(path, time.monotonic, time.time, 0.25)
    stop = asyncio.Event()
    ready.set()
    await asyncio.to_thread(go.wait)
    serving = asyncio.create_task(_requests(store, key, stop))
    await asyncio.sleep(0.5)
    took: list[float] = []
    for i in range(changes):
        started = time.perf_counter()
        await asyncio.to_thread(store.create, "acme", f"bench {i}")
        took.append(time.perf_counter() - started)
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.5)  # the front's last re-read
    stop.set()
    latencies = await serving
    return {"create_ms": took, "request_ms": latencies}


async def _front(path: Path, key: str, ready: Any, go: Any, done: Any) -> dict[str, Any]:
    store = KeyStore.open(path, time.monotonic, time.time, 0.25)
    stop = asyncio.Event()
    ready.set()
    await asyncio.to_thread(go.wait)
    serving = asyncio.create_task(_requests(store, key, stop))
    await asyncio.to_thread(done.wait)
    stop.set()
    return {"request_ms": await serving}


def _run_router(*args: Any) -> None:
    out = args[-1]
    out.put(("router", asyncio.run(_router(*args[:-1]))))


def _run_front(*args: Any) -> None:
    out = args[-1]
    out.put(("front", asyncio.run(_front(*args[:-1]))))


def _summary(values: list[float]) -> dict[str, float]:
    ms = sorted(v * 1000 for v in values)
    return {
        "p50": round(statistics.median(ms), 1),
        "p99": round(ms[int(len(ms) * 0.99)], 1),
        "max": round(ms[-1], 1),
    }


def main() -> None:
    parser = Parser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--keys", type=int, default=10_000, help="other tenants' keys in the file (0: none)"
    )
    parser.add_argument("--changes", type=int, default=25, help="CreateKeys made (1 or more)")
    args = parser.parse_args()
    # --keys 0: the file holds the bench's own key only (a baseline); no --changes: no figure
    # of a change (a StatisticsError traceback once the run was over)
    at_least(parser, 0, keys=args.keys)
    at_least(parser, 1, changes=args.changes)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "api-keys"
        key = _write_keys(path, args.keys)
        size = path.stat().st_size
        started = time.perf_counter()
        KeyFile(path).read()
        read_ms = (time.perf_counter() - started) * 1000
        ctx = multiprocessing.get_context("spawn")
        out = ctx.Queue()
        ready_r, ready_f, go, done = ctx.Event(), ctx.Event(), ctx.Event(), ctx.Event()
        router = ctx.Process(target=_run_router, args=(path, key, args.changes, ready_r, go, out))
        front = ctx.Process(target=_run_front, args=(path, key, ready_f, go, done, out))
        router.start()
        front.start()
        ready_r.wait()
        ready_f.wait()
        go.set()
        results = dict([out.get()])
        done.set()
        results.update([out.get()])
        router.join()
        front.join()
    print(
        json.dumps(
            {
                "keys": args.keys,
                "file_bytes": size,
                "KeyFile.read_ms": round(read_ms, 1),
                "create_key_ms": _summary(results["router"]["create_ms"]),
                "router_request_ms": _summary(results["router"]["request_ms"]),
                "front_request_ms": _summary(results["front"]["request_ms"]),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
