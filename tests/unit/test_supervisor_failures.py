"""The supervisor outlives its own failures: a process that cannot be started (its executable
missing during a rebuild, fork failing, its log's disk full) is tried again after the backoff,
and a state file that cannot be written is reported; neither ends supervision."""

from __future__ import annotations

import io
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from services.tools.stack import processes
from services.tools.stack.supervisor import STATE_FILE, Managed, Plan, Supervisor


def _until(check: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


class Napper:
    """A copy of ``sleep`` under a supervisor run in a thread; the test takes the executable
    away and puts it back."""

    def __init__(self, tmp_path: Path) -> None:
        sleep = shutil.which("sleep")
        assert sleep is not None
        self.exe = tmp_path / "bin" / "napper"
        self.exe.parent.mkdir()
        shutil.copy(sleep, self.exe)
        self.away = tmp_path / "bin" / "napper.away"
        self.pid_path = tmp_path / "pids" / "napper.pid"
        managed = Managed(
            name="napper",
            argv=[str(self.exe), "600"],
            env={},
            log_path=str(tmp_path / "logs" / "napper.log"),
            pid_path=str(self.pid_path),
            marker="napper",
            stop_wave=0,
        )
        self.out = io.StringIO()
        self.stop = threading.Event()
        supervisor = Supervisor(Plan(str(tmp_path), 2.0, [managed]), tmp_path, self.out)
        self.thread = threading.Thread(target=supervisor.run, args=(self.stop,))

    def pid(self) -> int | None:
        pid = processes.read_pid(self.pid_path)
        return pid if pid is not None and processes.is_alive(pid, "napper") else None

    def said(self, text: str) -> bool:
        return text in self.out.getvalue()


@pytest.fixture
def napper(tmp_path: Path) -> Iterator[Napper]:
    napper = Napper(tmp_path)
    yield napper
    napper.stop.set()
    napper.thread.join(30)
    left = napper.pid()  # a supervisor that died left it running
    if left is not None:
        os.kill(left, signal.SIGKILL)
    assert not napper.thread.is_alive() and left is None


def test_a_restart_that_fails_is_tried_again(napper: Napper) -> None:
    napper.thread.start()
    _until(lambda: napper.pid() is not None)
    first = napper.pid()
    assert first is not None
    napper.exe.rename(napper.away)  # a venv being rebuilt ...
    os.kill(first, signal.SIGKILL)  # ... when the process dies
    _until(lambda: napper.said("napper: could not start") or not napper.thread.is_alive())
    assert napper.thread.is_alive(), "the supervisor died on one failed restart"
    napper.away.rename(napper.exe)
    _until(lambda: napper.pid() not in (None, first))
    assert napper.thread.is_alive()


def test_a_first_start_that_fails_is_tried_again(napper: Napper) -> None:
    napper.exe.rename(napper.away)
    napper.thread.start()
    _until(lambda: napper.said("napper: could not start") or not napper.thread.is_alive())
    assert napper.thread.is_alive(), "the supervisor died on a failed first start"
    napper.away.rename(napper.exe)
    _until(lambda: napper.pid() is not None)


def test_a_state_file_that_cannot_be_written_does_not_end_supervision(
    tmp_path: Path, napper: Napper
) -> None:
    (tmp_path / STATE_FILE).mkdir()  # os.replace onto it fails, as on a full disk
    napper.thread.start()
    _until(lambda: napper.said("could not save the state") or not napper.thread.is_alive())
    assert napper.thread.is_alive(), "the supervisor died on a state file it could not write"
    _until(lambda: napper.pid() is not None)
    first = napper.pid()
    assert first is not None
    os.kill(first, signal.SIGKILL)
    _until(lambda: napper.pid() not in (None, first))


def test_a_services_log_is_opened_for_append_from_its_first_start(napper: Napper) -> None:
    """logrotate's copytruncate (the README's rotation) is safe only for a writer in O_APPEND
    mode: the first start opened the log "wb", so after a truncation the process went on
    writing at its old offset, leaving the copied bytes as a hole of NULs in the new file."""
    log = napper.pid_path.parent.parent / "logs" / "napper.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_bytes(b"a previous run's lines\n")
    napper.thread.start()
    _until(lambda: napper.pid() is not None)
    pid = napper.pid()
    flags = next(
        int(line.split()[1], 8)
        for line in Path(f"/proc/{pid}/fdinfo/1").read_text().splitlines()
        if line.startswith("flags:")
    )
    assert flags & os.O_APPEND
    assert log.read_bytes() == b""  # still one run per log: the previous run's lines gone
