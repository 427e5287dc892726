"""The supervisor on real (``sleep``) processes: a dead one is restarted, a held one is stopped
and kept stopped until its hold is lifted, then started again."""

from __future__ import annotations

import io
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from services.tools.stack import processes
from services.tools.stack.supervisor import HELD_DIR, Managed, Plan, Supervisor, read_state


def _until(check: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _pid(path: Path) -> int | None:
    pid = processes.read_pid(path)
    return pid if pid is not None and processes.is_alive(pid, "sleep") else None


def test_a_held_process_stays_stopped_until_released_and_a_dead_one_restarts(
    tmp_path: Path,
) -> None:
    sleep = shutil.which("sleep")
    assert sleep is not None
    pid_path = tmp_path / "pids" / "napper.pid"
    managed = Managed(
        name="napper",
        argv=[sleep, "600"],
        env={},
        log_path=str(tmp_path / "logs" / "napper.log"),
        pid_path=str(pid_path),
        marker="sleep",
        stop_wave=0,
    )
    out = io.StringIO()
    supervisor = Supervisor(Plan(str(tmp_path), 2.0, [managed]), tmp_path, out)
    stop = threading.Event()
    thread = threading.Thread(target=supervisor.run, args=(stop,))
    thread.start()
    try:
        _until(lambda: _pid(pid_path) is not None)
        first = _pid(pid_path)
        assert first is not None
        os.kill(first, signal.SIGKILL)  # dies: restarted
        _until(lambda: _pid(pid_path) not in (None, first))

        (tmp_path / HELD_DIR).mkdir()
        (tmp_path / HELD_DIR / "napper").touch()  # held: stopped, and not restarted
        _until(lambda: _pid(pid_path) is None and "stopped (held)" in out.getvalue())
        time.sleep(1.5)  # more than the first restart's backoff
        assert _pid(pid_path) is None

        (tmp_path / HELD_DIR / "napper").unlink()  # released: started again
        _until(lambda: _pid(pid_path) is not None)
        # `make stop SERVICE=napper`, then `make up`: the deliberate stop and start are not
        # restarts of what died (make status showed "(2 restarts)" here): the kill only
        _until(lambda: read_state(tmp_path).get("napper", {}).get("pid") == _pid(pid_path))
        assert read_state(tmp_path)["napper"]["restarts"] == 1
        assert "(#2)" not in Path(managed.log_path).read_text()
    finally:
        stop.set()
        thread.join(30)
    assert _pid(pid_path) is None and not thread.is_alive()
