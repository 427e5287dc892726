"""``tests.processes.stop_process``: a process that takes its first SIGTERM (a service's
drain, or one still starting) is killed past the bound, never left running after its test.
Before, ``terminate(); wait(timeout)`` raised TimeoutExpired with the process still alive."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from tests.processes import stop_process

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

