"""Measured points: a warm-up, then the plan at N in flight, with the CPU each service spent
on the measured requests when the bench owns the stack.

``run_point`` is one run; ``combine`` pools several runs of the same point (their samples,
their walls added, their CPU added), so that runs interleaved with another stack's (A B B A)
give one figure each; ``measure`` is a point of one run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cachemesh.loadtest.load import run_load, warm_up
from cachemesh.loadtest.runner import LoadShape
from cachemesh.loadtest.samples import Sample
from cachemesh.loadtest.stats import summarise
from cachemesh.loadtest.workloads import Item
from services.tools.bench.gateway.cpu import per_request, ticks_between
from services.tools.bench.gateway.stacks import Target

DURATION_S = 180.0  # a bound on each measured run, never reached on a working stack
TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Run:
    samples: list[Sample]  # the warm-up's marked
    wall_s: float  # first measured send to last answer
    warmup_requests: int
    cpu_ticks: dict[str, int] | None  # per service, over the measured requests only


def _wall(samples: Sequence[Sample]) -> float:
    measured = [s for s in samples if not s.warmup]
    if not measured:
        return 0.0
    return max(s.started_s + s.latency_s for s in measured) - min(s.started_s for s in measured)


def run_point(
    target: Target, warm: Sequence[Item], plan: Sequence[Item], level: int, label: str
) -> Run:
    shape = LoadShape("closed", level, 0.0, DURATION_S, stream=False, timeout_s=TIMEOUT_S)
    samples = warm_up(target.address, target.keys, warm, shape, label)
    before = target.cpu.sample() if target.cpu else None
    measured = run_load(target.address, target.keys, [], plan, shape, 1, label)
    after = target.cpu.sample() if target.cpu else None
    ticks = ticks_between(before, after) if before is not None and after is not None else None
    return Run(samples + measured, _wall(measured), len(warm), ticks)


def combine(
    target: Target, level: int, runs: Sequence[Run],
    labels: Mapping[frozenset[str], int] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The point's ``results`` (SCHEMA.md) over ``runs`` with ``concurrency``, ``stack``,
    ``runs``, ``warmup_requests`` and, on the bench's own stacks, ``cpu``."""
    samples = [s for run in runs for s in run.samples]
    row: dict[str, Any] = {
        "concurrency": level,
        "stack": target.name,
        "runs": len(runs),
        "warmup_requests": sum(run.warmup_requests for run in runs),
    }
    row.update(summarise(samples, labels or {}, wall_s=sum(run.wall_s for run in runs)))
    ticks = [run.cpu_ticks for run in runs]
    if target.cpu is not None and all(t is not None for t in ticks):
        spent = {name: sum(t[name] for t in ticks if t is not None) for name in target.cpu.pids}
        row["cpu"] = per_request(spent, row["completed"], target.cpu.ticks_per_s)
    return row


def measure(
    target: Target, warm: Sequence[Item], plan: Sequence[Item], level: int, label: str,
    labels: Mapping[frozenset[str], int] | None = None,
) -> dict[str, Any]:  # fmt: skip
    return combine(target, level, [run_point(target, warm, plan, level, label)], labels)
