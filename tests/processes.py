"""The end of a process a test started: SIGTERM, then SIGKILL past a bound.

A service takes its first SIGTERM as the start of its drain (``stop_on_signals``), and one
still starting keeps it for later: a test's ``proc.terminate(); proc.wait(timeout=...)`` then
raised ``TimeoutExpired`` and left the process running after the test (its ports, its data
directory's lock, its Redis), for every later test and past pytest's own end."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Sequence
from typing import Any


def stop_process(
    proc: subprocess.Popen[Any], timeout_s: float, sig: signal.Signals = signal.SIGTERM
) -> int:
    """Sends ``sig`` to ``proc`` (if it still runs) and returns its exit status once it ends;
    past ``timeout_s`` it is killed, waited for, and an AssertionError says so: no process
    outlives its test."""
    (status,) = stop_processes([proc], timeout_s, sig)
    return status


def stop_processes(
    procs: Sequence[subprocess.Popen[Any]],
    timeout_s: float,
    sig: signal.Signals = signal.SIGTERM,
) -> list[int]:
    """``stop_process`` for several at once (their drains overlap): each one past the bound
    killed, then one AssertionError naming them all."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(sig)
    deadline = time.monotonic() + timeout_s
    late = []
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            late.append(f"pid {proc.pid} ({proc.args!r:.80})")
    if late:
        raise AssertionError(
            f"{', '.join(late)} did not end within {timeout_s:g} s of {sig.name}: killed"
        )
    return [proc.returncode for proc in procs]
