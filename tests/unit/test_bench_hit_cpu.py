"""``bench.hit_cpu``'s round: CPU and req/s of the measured hits only, not of the round's
priming miss (a model call, prefix-cache's commits, the Store's embedding) and its idle half
second, counted before as two more hits."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from services.tools.bench.gateway.chain import two_hop
from services.tools.bench.gateway.cpu import CpuProbe
from services.tools.bench.hit_cpu import __main__ as hit_cpu


class _Stack:
    router_address = "127.0.0.1:1"


def test_a_round_counts_the_measured_hits_only(monkeypatch: pytest.MonkeyPatch) -> None:
    ticks = {"router": 0, "semantic-cache": 0}
    pids = {"router": 1, "semantic-cache": 2}
    names = {pid: name for name, pid in pids.items()}

    def stat(pid: int) -> str:  # /proc/<pid>/stat: utime is the 14th field, stime the 15th
        return f"{pid} (python) S " + "0 " * 10 + f"{ticks[names[pid]]} 0 0 0"

    probe = CpuProbe(pids, stat, ticks_per_s=1000)

    async def hits(
        target: str, key: str, requests: int, concurrency: int, measure_from: Callable[[], None]
    ) -> int:
        ticks["router"] += 40  # the miss and the warm hit: 40 ms of the router's CPU
        ticks["semantic-cache"] += 60  # its Store's embedding
        measure_from()
        ticks["router"] += requests * 1  # 1 ms a hit
        ticks["semantic-cache"] += requests // 2  # 0.5 ms a hit
        return requests

    monkeypatch.setattr(hit_cpu, "_hits", hits)
    figures: dict[str, Any] = hit_cpu._round(_Stack(), probe, "k", 100, 8)  # type: ignore[arg-type]
    # before: (40 + 100) / 102 = 1.373 and (60 + 50) / 102 = 1.078 ms a hit
    assert figures["requests"] == 100
    assert figures["ms_per_request"]["router"] == 1.0
    assert figures["ms_per_request"]["semantic-cache"] == 0.5
    assert figures["requests_per_s"] > 0


def test_a_miss_round_sends_the_agent_misses(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--miss``: the round sends ``_misses`` (given the data directory), not ``_hits``, and
    its figures are per miss."""
    ticks = {"router": 0}
    probe = CpuProbe(
        {"router": 1}, lambda pid: "1 (python) S " + "0 " * 10 + f"{ticks['router']} 0 0 0", 1000
    )
    sent: list[object] = []

    async def misses(
        target: str,
        key: str,
        requests: int,
        concurrency: int,
        measure_from: Callable[[], None],
        data_dir: object,
    ) -> int:
        sent.append(data_dir)
        measure_from()
        ticks["router"] += requests * 7  # 7 ms a miss
        return requests

    async def hits(*args: object) -> int:
        raise AssertionError("a miss round sent hits")

    monkeypatch.setattr(hit_cpu, "_misses", misses)
    monkeypatch.setattr(hit_cpu, "_hits", hits)
    data = Path("/data")
    figures: dict[str, Any] = hit_cpu._round(_Stack(), probe, "k", 50, 32, data)  # type: ignore[arg-type]
    assert sent == [data]
    assert figures["requests"] == 50
    assert figures["ms_per_request"]["router"] == 7.0


def test_the_floor_is_the_echo_fronts_cpu_per_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--floor``: the chain's front's CPU over each measured run only (not the warm-up's),
    per request, and their median."""
    ticks = {"front": 0}
    runs: list[tuple[int, int]] = []

    class Running:
        front_pid = 7

        def __init__(self, chain: object) -> None:
            pass

        def __enter__(self) -> Running:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def run(self, level: int, requests: int) -> None:
            runs.append((level, requests))
            ticks["front"] += requests * (5 if len(runs) == 1 else 2)  # the warm-up: 5 ms each

    def stat(pid: int) -> str:
        assert pid == 7
        return "7 (python) S " + "0 " * 10 + f"{ticks['front']} 0 0 0"

    monkeypatch.setattr(hit_cpu, "RunningChain", Running)
    monkeypatch.setattr(hit_cpu, "clock_ticks_per_s", lambda: 1000)
    report = hit_cpu.floor(two_hop(600), 300, 8, 3, read=stat)
    assert runs == [(8, 200), (8, 300), (8, 300), (8, 300)]
    assert report["front_ms_per_request"] == [2.0, 2.0, 2.0]
    assert report["front_ms_per_request_median"] == 2.0
    assert report["chain"] == "two_hops"
