"""``tests.processes.stop_process``: a process that takes its first SIGTERM (a service's
drain, or one still starting) is killed past the bound, never left running after its test.
Before, ``terminate(); wait(timeout)`` raised TimeoutExpired with the process still alive."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

import pytest

from services.common.server import ServerSettings, ServiceSpec, run_service
from tests.processes import stop_process
from tests.waits import reached

KEEPS_SIGTERM = """
import signal, time
signal.signal(signal.SIGTERM, lambda *_: None)  # a drain that never ends, say
print("up", flush=True)
time.sleep(600)
"""


def test_a_process_that_takes_the_sigterm_is_killed_not_left_running() -> None:
    with subprocess.Popen([sys.executable, "-c", KEEPS_SIGTERM], stdout=subprocess.PIPE) as child:
        try:
            assert child.stdout is not None and child.stdout.readline() == b"up\n"
            with pytest.raises(AssertionError, match=r"did not end within 0\.5 s of SIGTERM"):
                stop_process(child, 0.5)
            assert child.poll() == -signal.SIGKILL
        finally:
            child.kill()


def test_a_process_that_ends_gives_its_status() -> None:
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]) as child:
        assert stop_process(child, 30) == -signal.SIGTERM
        assert stop_process(child, 30) == -signal.SIGTERM  # ended already: nothing sent


async def test_a_service_run_in_this_process_leaves_the_stop_signals_to_pytest() -> None:
    """``run_service`` in a test's own process (the unit tests') installed its handlers there:
    a SIGTERM sent to end a hung test run only set that service's ``stop`` (the process went
    on). The unit tests' conftest leaves the signals to pytest."""
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    warming = asyncio.Event()

    async def warmup() -> None:  # run after the handlers would be installed
        warming.set()

    spec = ServiceSpec(
        name="signals-test",
        settings=ServerSettings("127.0.0.1:0", grace_s=0.1, max_message_bytes=1 << 20),
        service_names=["test.v1.Nothing"],
        register=lambda server: None,
        warmup=warmup,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(run_service(spec, stop))
    try:
        await reached(warming, "the service's warm-up")
        assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
