"""CPU time per request of each service process, from ``/proc/<pid>/stat`` (utime + stime).

A ``CpuProbe`` reads every service's counters; ``ticks_between`` turns two readings around
a run into the ticks each service spent, ``per_request`` those into seconds per service and
milliseconds per request. The reader of the stat text and
the clock-tick rate are injected, so the arithmetic is tested on fake ``/proc`` text.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

StatReader = Callable[[int], str]  # pid -> the text of /proc/<pid>/stat


def read_proc_stat(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text()


def clock_ticks_per_s() -> int:
    return os.sysconf("SC_CLK_TCK")


def cpu_ticks(stat: str) -> int:
    """utime + stime in clock ticks (fields 14 and 15 of proc(5)); the command name, field 2,
    may hold spaces and parentheses, so the fields are counted from its last ')'."""
    fields = stat.rpartition(")")[2].split()
    if len(fields) < 13:
        raise ValueError(f"not a /proc/<pid>/stat line: {stat[:80]!r}")
    return int(fields[11]) + int(fields[12])


@dataclass(frozen=True)
class CpuProbe:
    pids: Mapping[str, int]  # service name -> its process id
    read: StatReader
    ticks_per_s: int

    def sample(self) -> dict[str, int]:
        """Service name -> its CPU ticks so far."""
        return {name: cpu_ticks(self.read(pid)) for name, pid in self.pids.items()}


def ticks_between(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    """The ticks each service spent between two samples of the same services."""
    if before.keys() != after.keys():
        raise ValueError(f"samples of different services: {sorted(before)} / {sorted(after)}")
    return {name: after[name] - before[name] for name in before}


def per_request(spent: Mapping[str, int], requests: int, ticks_per_s: int) -> dict[str, Any]:
    """CPU seconds each service spent (``spent``, in ticks), and milliseconds per request
    (``total``: all services together); ``requests`` is how many were answered."""
    seconds = {name: ticks / ticks_per_s for name, ticks in spent.items()}
    seconds["total"] = sum(seconds.values())
    return {
        "requests": requests,
        "resolution_ms": round(1000 / ticks_per_s, 3),
        "seconds": {name: round(s, 3) for name, s in seconds.items()},
        "ms_per_request": {
            name: round(s * 1000 / requests, 3) if requests else None for name, s in seconds.items()
        },
    }
