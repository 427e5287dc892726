"""Pid files name one process (pid and start time): a stale file whose pid was reused after a
crash or a reboot, even by a program whose command line looks like the stack's (the host's own
redis-server), is never stopped by ``down`` nor adopted by ``up``."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.tools.stack import processes
from services.tools.stack.lifecycle import Stack

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def other_redis(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Somebody else's process whose command line says redis-server, in a session of its own."""
    sleep = shutil.which("sleep")
    assert sleep is not None
    exe = tmp_path / "bin" / "redis-server"
    exe.parent.mkdir()
    shutil.copy(sleep, exe)
    process = subprocess.Popen([str(exe), "600"], start_new_session=True)
    while not processes.is_alive(process.pid, "redis-server"):  # until it has exec'd
        assert process.poll() is None
        time.sleep(0.01)
    yield process
    process.kill()
    process.wait()


def _redis_pid_file(run_dir: Path) -> Path:
    path = run_dir / "pids" / "redis.pid"
    path.parent.mkdir(parents=True)
    return path


def _older_runners_file(tmp_path: Path, pid: int) -> tuple[Path, io.StringIO, Stack]:
    """A redis pid file naming ``pid`` without its start time (an older runner's), and a
    stack of that run directory saying what it does to ``out``."""
    path = _redis_pid_file(tmp_path / "run")
    path.write_text(f"{pid}\n")
    out = io.StringIO()
    return path, out, Stack(ROOT, tmp_path / "run", out=out)


def test_a_pid_file_records_the_start_time_and_names_that_process_only(
    tmp_path: Path, other_redis: subprocess.Popen[bytes]
) -> None:
    path = tmp_path / "redis.pid"
    processes.write_pid(path, other_redis.pid)
    started = processes.start_time(other_redis.pid)
    assert started is not None and path.read_text() == f"{other_redis.pid} {started}\n"
    assert processes.read_pid(path) == other_redis.pid
    path.write_text(f"{other_redis.pid} {int(started) + 1}\n")  # the pid, reused since
    assert processes.read_pid(path) is None


def test_down_leaves_a_process_whose_pid_was_reused_running(
    tmp_path: Path, other_redis: subprocess.Popen[bytes]
) -> None:
    path = _redis_pid_file(tmp_path / "run")
    started = processes.start_time(other_redis.pid)
    assert started is not None
    path.write_text(f"{other_redis.pid} {int(started) + 1}\n")
    stack = Stack(ROOT, tmp_path / "run", out=io.StringIO())
    assert stack.running() == []
    assert stack.stop(grace_s=0.1) == []
    assert other_redis.poll() is None
    assert not path.exists()


def test_down_leaves_the_process_of_an_older_pid_file_running_and_says_so(
    tmp_path: Path, other_redis: subprocess.Popen[bytes]
) -> None:
    path, out, stack = _older_runners_file(tmp_path, other_redis.pid)
    assert stack.stop(grace_s=0.1) == []
    assert other_redis.poll() is None, "down stopped a process it cannot tell is the stack's"
    assert f"records pid {other_redis.pid} without its start time" in out.getvalue()
    assert not path.exists()


def test_down_stops_the_process_its_pid_file_names(
    tmp_path: Path, other_redis: subprocess.Popen[bytes]
) -> None:
    processes.write_pid(_redis_pid_file(tmp_path / "run"), other_redis.pid)
    stack = Stack(ROOT, tmp_path / "run", out=io.StringIO())
    assert [r.pid for r in stack.running()] == [other_redis.pid]
    assert stack.stop(grace_s=5.0) == ["redis"]
    assert other_redis.wait(10) != 0


def test_reading_the_pid_files_leaves_a_stale_one_to_the_supervisor(tmp_path: Path) -> None:
    """``running`` (``status``, a test's ``pid_of``) only reads: the supervisor writes a
    restarted process's pid over its dead one's at any moment, and a reader that removed the
    file it had just judged stale now and then removed the new one (the chaos test then never
    saw prefix-cache back)."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    path = _redis_pid_file(tmp_path / "run")
    path.write_text(f"{dead.pid} 1\n")
    stack = Stack(ROOT, tmp_path / "run", out=io.StringIO())
    assert stack.running() == []
    assert path.read_text() == f"{dead.pid} 1\n"


def test_asking_for_the_supervisor_leaves_its_stale_pid_file_to_up(tmp_path: Path) -> None:
    """``supervisor_pid`` (``status``, ``down``, ``up``) only reads too: an ``up`` in another
    shell writes its new supervisor's file at any moment, and a reader that removed the file
    it had judged stale removed that new one now and then (the supervisor then ran unseen:
    ``down`` left it running, the next ``up`` started a second one)."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    path = tmp_path / "run" / "pids" / "supervisor.pid"
    path.parent.mkdir(parents=True)
    path.write_text(f"{dead.pid} 1\n")
    assert Stack(ROOT, tmp_path / "run", out=io.StringIO()).supervisor_pid() is None
    assert path.read_text() == f"{dead.pid} 1\n"


def test_an_older_pid_file_is_named_once_however_often_it_is_read(
    tmp_path: Path, other_redis: subprocess.Popen[bytes]
) -> None:
    _, out, stack = _older_runners_file(tmp_path, other_redis.pid)
    assert stack.running() == [] and stack.running() == []
    assert out.getvalue().count(f"records pid {other_redis.pid} without its start time") == 1


def test_a_pid_file_is_replaced_whole_never_rewritten_in_place(
    tmp_path: Path, other_redis: subprocess.Popen[bytes]
) -> None:
    """A reader holding the old file reads it whole: the new one is another file put in its
    place (a reader of a file rewritten in place could find it empty, and take the process
    for stopped)."""
    path = _redis_pid_file(tmp_path / "run")
    path.write_text("12345 678\n")
    with path.open() as old:
        processes.write_pid(path, other_redis.pid)
        assert old.read() == "12345 678\n"
    assert processes.read_pid(path) == other_redis.pid
    assert [p.name for p in path.parent.iterdir()] == ["redis.pid"]


def test_a_pid_file_that_cannot_be_written_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _redis_pid_file(tmp_path / "run")

    def full(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError):
        processes.write_pid(path, os.getpid())
    assert list(path.parent.iterdir()) == []
