"""The start-up heap is frozen before SERVING: later full GC passes skip it.

Run in a fresh interpreter: freezing is process-wide, and the pytest process's own heap
must not be frozen by the test."""

from __future__ import annotations

import subprocess
import sys
import textwrap

_SERVICE = textwrap.dedent(
    """
    import asyncio, gc
    from services.common.server import ServerSettings, ServiceSpec, run_service

    async def main() -> None:
        state = {}
        serving = asyncio.Event()

        async def warm() -> None:
            state["tables"] = [[i] for i in range(10_000)]  # start-up state (tracked lists)

        spec = ServiceSpec(
            name="heap-test",
            settings=ServerSettings("127.0.0.1:0", grace_s=0.1, max_message_bytes=1 << 20),
            service_names=["test.v1.Nothing"],
            register=lambda server: None,
            warmup=warm,
        )
        stop = asyncio.Event()
        task = asyncio.create_task(run_service(spec, stop))
        for _ in range(200):  # until the service is past its warm-up (10 s at most)
            if "tables" in state and gc.get_freeze_count() >= 10_000:
                break
            await asyncio.sleep(0.05)
        later = [[0]]  # made while serving: still walked by the collector
        tracked = {id(o) for o in gc.get_objects()}
        print("frozen", gc.get_freeze_count() >= 10_000)
        print("startup walked", id(state["tables"]) in tracked)
        print("later walked", id(later) in tracked)
        stop.set()
        await task

    asyncio.run(main())
    """
)


def test_start_up_objects_are_frozen_before_serving_and_later_ones_are_not() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _SERVICE], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:3] == [
        "frozen True",
        "startup walked False",
        "later walked True",
    ]
