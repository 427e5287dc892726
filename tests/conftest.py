"""Hooks for every test: reports that pytest-xdist's workers can send to the controller, and
each test process's own range of free ports.

``make test`` runs the tests in worker processes (``-n``). A worker sends each test's report,
its captured output and log text included, to the controller as UTF-8; a test whose captured
log holds a lone surrogate (the OTLP encoder's tests log attribute keys that are not valid
UTF-8, as the exporter logs them) made the send raise, and the worker died with it. The text
is escaped (``\\udfff``) before it is sent; what the test itself saw is unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import IO

import pytest

from services.tools.stack.ports import PORT_RANGE_VAR, claim_port_block

# Each process that runs tests (an xdist worker, or pytest without workers) takes its free
# ports from a block of its own below Linux's ephemeral ports (32768-60999), claimed machine
# wide: a port chosen free is released until its service binds it, and meanwhile the kernel
# handed one to the other worker's gRPC server (services.tools.stack.ports); and two test runs
# at once (two checkouts' ``make test``) gave both their gw0 the same range (20000-22999).
_HELD_BLOCK = pytest.StashKey[IO[bytes]]()


def pytest_configure(config: pytest.Config) -> None:
    # numpy's OpenBLAS starts a thread a core, which spin while they wait: with two workers
    # (and their services) on two cores, test_router_fit_writes.py's Newton solves (390 x 390)
    # took 23.5 s of CPU instead of 11; no test's matrices are large enough to gain from more.
    # Set before any test module imports numpy (none has by now); a value given is kept.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    if PORT_RANGE_VAR in os.environ or _xdist_controller(config):
        return  # a range given is kept; the controller runs no test
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # gw0, gw1, ...; unset: one process
    number = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0
    span, held = claim_port_block(number)
    config.stash[_HELD_BLOCK] = held  # held until this process ends
    os.environ[PORT_RANGE_VAR] = span


def pytest_unconfigure(config: pytest.Config) -> None:
    held = config.stash.get(_HELD_BLOCK, None)
    if held is not None:
        os.environ.pop(PORT_RANGE_VAR, None)
        held.close()


def _xdist_controller(config: pytest.Config) -> bool:
    """pytest-xdist's controller (``-n N``, N > 0): its workers run the tests."""
    workers = getattr(config.option, "numprocesses", None)
    return not hasattr(config, "workerinput") and bool(workers)


def _sendable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    report.sections = [(title, _sendable(text)) for title, text in report.sections]
    return report
