"""Hooks for every test: reports that pytest-xdist's workers can send to the controller, and
each worker's own range of free ports.

``make test`` runs the tests in worker processes (``-n``). A worker sends each test's report,
its captured output and log text included, to the controller as UTF-8; a test whose captured
log holds a lone surrogate (the OTLP encoder's tests log attribute keys that are not valid
UTF-8, as the exporter logs them) made the send raise, and the worker died with it. The text
is escaped (``\\udfff``) before it is sent; what the test itself saw is unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest

from services.tools.stack.ports import PORT_RANGE_VAR

# Each worker's stacks take their free ports from a range of their own, below Linux's
# ephemeral ports (32768-60999): a port one worker chose free, released until its service
# bound it, was handed meanwhile to the other worker's gRPC server (services.tools.stack.ports)
_WORKER_PORTS = 3_000
_FIRST_PORT = 20_000


def pytest_configure(config: pytest.Config) -> None:
    # numpy's OpenBLAS starts a thread a core, which spin while they wait: with two workers
    # (and their services) on two cores, test_router_fit_writes.py's Newton solves (390 x 390)
    # took 23.5 s of CPU instead of 11; no test's matrices are large enough to gain from more.
    # Set before any test module imports numpy (none has by now); a value given is kept.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # gw0, gw1, ...; unset: one process
    if worker.startswith("gw") and worker[2:].isdigit() and PORT_RANGE_VAR not in os.environ:
        low = _FIRST_PORT + int(worker[2:]) * _WORKER_PORTS
        os.environ[PORT_RANGE_VAR] = f"{low}-{low + _WORKER_PORTS - 1}"


def _sendable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    report.sections = [(title, _sendable(text)) for title, text in report.sections]
    return report
