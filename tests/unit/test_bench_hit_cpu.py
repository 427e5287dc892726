"""``bench.hit_cpu``'s round: CPU and req/s of the measured hits only, not of the round's
priming miss (a model call, prefix-cache's commits, the Store's embedding) and its idle half
second, counted before as two more hits."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from services.tools.bench.gateway import cases
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
        round_number: int = 0,
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


def test_each_miss_round_draws_its_own_turns(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--miss``: round n's turns are drawn with a seed of their own (round 0: make bench's,
    the level); every round sent the same turns before, and semantic-cache's CPU a miss fell
    from 19.5 ms in the first round to 5.5-6.8 in the next three."""
    seeds: list[int] = []

    def agent_misses(data_dir: Path, namespace: str, count: int, seed: int) -> list[object]:
        seeds.append(seed)
        return []

    class Client:
        def __init__(self, target: str, api_key: str) -> None:
            pass

        async def __aenter__(self) -> Client:
            return self

        async def __aexit__(self, *exc: object) -> None:
            pass

    monkeypatch.setattr(cases, "agent_misses", agent_misses)
    monkeypatch.setattr(hit_cpu, "AsyncClient", Client)
    for number in range(3):
        served = asyncio.run(
            hit_cpu._misses("127.0.0.1:1", "k", 5, 8, lambda: None, Path("/data"), number)
        )
        assert served == 0
    assert seeds[0] == 8
    assert len(set(seeds)) == 3


def test_compared_stacks_meet_the_same_turns_each_round(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--compare --miss``: in each round both stacks are sent that round's turns (A B B A)."""
    rounds: list[tuple[str, int]] = []

    @contextmanager
    def stack(root: Path, name: str, extra: dict[str, str]) -> Iterator[tuple[str, None, str]]:
        yield name, None, "k"

    def one_round(
        name: str,
        probe: None,
        key: str,
        requests: int,
        concurrency: int,
        miss: Path | None = None,
        round_number: int = -1,
    ) -> dict[str, Any]:
        rounds.append((name, round_number))
        return {"ms_per_request": {"router": 1.0}}

    monkeypatch.setattr(hit_cpu, "_stack", stack)
    monkeypatch.setattr(hit_cpu, "_round", one_round)
    roots = {"this": Path("/a"), "compared": Path("/b")}
    hit_cpu.measure(roots, 10, 1, 3, miss=Path("/data"))
    assert rounds == [
        ("this", 0),
        ("compared", 0),
        ("compared", 1),
        ("this", 1),
        ("this", 2),
        ("compared", 2),
    ]


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
