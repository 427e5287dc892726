"""The stacks ``make bench`` starts for itself: on free loopback ports, in run dirs of their
own under ``.run/``, so they never meet a ``make up`` stack or each other; each starts with no
state an earlier bench left (its L1 entries, its warm prefixes in the durable Redis, its
journal), so one run's figures never ride on the last one's caches."""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from services.tools.bench.gateway.cpu import CpuProbe, clock_ticks_per_s, read_proc_stat
from services.tools.keys import ensure_keys
from services.tools.stack.lifecycle import Stack
from services.tools.stack.service_table import SERVICES

TRACES_OFF = {"OTEL_TRACES_EXPORTER": "none"}
SIM_ZERO = {"SIM_TIME_SCALE": "0"}


def traces_to(endpoint: str) -> dict[str, str]:
    """Export every span over OTLP/gRPC to ``endpoint`` (the exporter's own defaults else)."""
    return {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}


@dataclass(frozen=True)
class Target:
    """Where a case sends its requests, with which keys; ``cpu`` when the bench owns the
    stack (it knows the pids), else None."""

    address: str
    keys: dict[str, str]  # tenant -> API key
    cpu: CpuProbe | None
    name: str


@dataclass(frozen=True)
class BenchStack:
    name: str
    overrides: dict[str, str]  # what it sets over the shared settings, ports included
    target: Target
    secrets: tuple[str, ...]  # its keys and internal token, masked wherever they appear


@contextmanager
def bench_stack(root: Path, name: str, settings: Mapping[str, str]) -> Iterator[BenchStack]:
    """A whole stack with ``settings`` over ``.env``, started, and stopped on the way out."""
    run_dir = root / ".run" / f"bench-{name}"
    keys = ensure_keys(run_dir)  # throwaway keys, made here so the runner does not print them
    stack = Stack.on_free_ports(root, run_dir, settings)
    fresh_state(stack, run_dir)
    stack.start()
    try:
        pids = {r.service.name: r.pid for r in stack.running()}
        missing = [s.name for s in SERVICES if s.name not in pids]
        if missing:
            raise RuntimeError(f"bench stack {name}: no live process for {missing}")
        probe = CpuProbe(pids, read_proc_stat, clock_ticks_per_s())
        target = Target(stack.router_address, dict(keys.api_keys), probe, name)
        secrets = (*keys.api_keys.values(), keys.internal_token)
        overrides = {k: v for k, v in stack.settings().items() if k in _changed(root, stack)}
        yield BenchStack(name, overrides, target, secrets)
    finally:
        stack.stop()


def fresh_state(stack: Stack, run_dir: Path) -> None:
    """Removes what an earlier bench's stack kept under ``run_dir/data`` (L1's log and
    snapshot, the Redis append-only file with its warm prefixes, the router's journal): an L2
    warmed by the run before would raise this run's savings (a 1-hour prefix outlives the
    minutes between two runs). Never while a stack of that run dir is running."""
    if stack.supervisor_pid() is not None:
        raise RuntimeError(
            f"a bench stack is still running in {run_dir}: stop it first "
            f"(python -m services.tools.stack --run-dir {run_dir} down)"
        )
    shutil.rmtree(run_dir / "data", ignore_errors=True)


def _changed(root: Path, stack: Stack) -> set[str]:
    plain = Stack(root).settings()
    return {k for k, v in stack.settings().items() if plain.get(k) != v}
