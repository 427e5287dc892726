"""One measured point: a warm-up, then the plan at N in flight; the CPU each service spent on
the measured requests when the bench owns the stack."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cachemesh.loadtest.load import run_load, warm_up
from cachemesh.loadtest.runner import LoadShape
from cachemesh.loadtest.stats import summarise
from cachemesh.loadtest.workloads import Item
from services.bench.cpu import per_request
from services.bench.stacks import Target

DURATION_S = 180.0  # a bound on each measured point, never reached on a working stack
TIMEOUT_S = 60.0


def measure(
    target: Target, warm: Sequence[Item], plan: Sequence[Item], level: int, label: str,
    labels: Mapping[frozenset[str], int] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The point's ``results`` (SCHEMA.md) with ``concurrency``, ``stack`` and, on the bench's
    own stacks, ``cpu`` (CPU seconds per service over the measured requests only)."""
    shape = LoadShape("closed", level, 0.0, DURATION_S, stream=False, timeout_s=TIMEOUT_S)
    samples = warm_up(target.address, target.keys, warm, shape, label)
    before = target.cpu.sample() if target.cpu else None
    samples += run_load(target.address, target.keys, [], plan, shape, 1, label)
    after = target.cpu.sample() if target.cpu else None
    row: dict[str, Any] = {"concurrency": level, "stack": target.name, "warmup_requests": len(warm)}
    row.update(summarise(samples, labels or {}))
    if target.cpu is not None and before is not None and after is not None:
        row["cpu"] = per_request(before, after, row["completed"], target.cpu.ticks_per_s)
    return row
