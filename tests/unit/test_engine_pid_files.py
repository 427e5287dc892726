"""llama-server pid files name one process (pid and start time), as the stack's own do
(``services.tools.stack.processes``): a stale ``llama-server-N.pid`` whose pid was reused after
a crash or a reboot, even by a program that is a llama-server too (one the user runs, another
checkout's), is never stopped by ``down`` nor taken for a replica by ``up --local-engine``."""

from __future__ import annotations

import io
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.tools.engine.cache import engine_paths
from services.tools.engine.servers import EngineOptions, LlamaServers
from services.tools.stack import processes


@pytest.fixture
def other_llama(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Somebody else's process whose command line says llama-server, in a session of its own."""
    sleep = shutil.which("sleep")
    assert sleep is not None
    exe = tmp_path / "bin" / "llama-server"
    exe.parent.mkdir()
    shutil.copy(sleep, exe)
    process = subprocess.Popen([str(exe), "600"], start_new_session=True)
    while not processes.is_alive(process.pid, "llama-server"):  # until it has exec'd
        assert process.poll() is None
        time.sleep(0.01)
    yield process
    process.kill()
    process.wait()


def _engines(run_dir: Path, out: io.StringIO | None = None) -> LlamaServers:
    paths = engine_paths({"CACHEMESH_CACHE_DIR": str(run_dir / "cache")})
    return LlamaServers(paths, run_dir, EngineOptions(), out=out or io.StringIO())


def _pid_file(run_dir: Path) -> Path:
    path = run_dir / "pids" / "llama-server-1.pid"
    path.parent.mkdir(parents=True)
    return path


def test_down_leaves_a_llama_server_whose_pid_was_reused_running(
    tmp_path: Path, other_llama: subprocess.Popen[bytes]
) -> None:
    path = _pid_file(tmp_path)
    started = processes.start_time(other_llama.pid)
    assert started is not None
    path.write_text(f"{other_llama.pid} {int(started) + 1}\n")  # a replica's, the pid reused since
    engines = _engines(tmp_path)
    assert engines.recorded_pids() == []
    assert engines.stop(grace_s=0.1) == []
    assert other_llama.poll() is None, "down stopped a llama-server that is not the stack's"
    assert not path.exists()


def test_down_leaves_the_process_of_an_older_pid_file_running_and_says_so(
    tmp_path: Path, other_llama: subprocess.Popen[bytes]
) -> None:
    path = _pid_file(tmp_path)
    path.write_text(f"{other_llama.pid}\n")  # no start time: written by an older runner
    out = io.StringIO()
    assert _engines(tmp_path, out).stop(grace_s=0.1) == []
    assert other_llama.poll() is None, "down stopped a process it cannot tell is the stack's"
    assert f"records pid {other_llama.pid} without its start time" in out.getvalue()
    assert not path.exists()


def test_a_process_that_is_no_llama_server_is_never_taken_for_one(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        processes.write_pid(_pid_file(tmp_path), sleeper.pid)
        assert _engines(tmp_path).stop(grace_s=0.1) == []
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


def test_down_stops_the_replica_its_pid_file_names(
    tmp_path: Path, other_llama: subprocess.Popen[bytes]
) -> None:
    path = _pid_file(tmp_path)
    processes.write_pid(path, other_llama.pid)
    assert path.read_text() == f"{other_llama.pid} {processes.start_time(other_llama.pid)}\n"
    engines = _engines(tmp_path)
    assert engines.recorded_pids() == [other_llama.pid]
    assert engines.stop(grace_s=5.0) == [other_llama.pid]
    assert other_llama.wait(10) != 0
    assert not path.exists()


def test_reading_the_replicas_pid_files_leaves_a_stale_one_to_its_writer(tmp_path: Path) -> None:
    """``recorded_pids`` (``status``, ``down``) only reads, as the stack's own readers do
    (``processes.recorded_pid``): an ``up`` starting replicas writes their files at any moment."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    path = _pid_file(tmp_path)
    path.write_text(f"{dead.pid} 1\n")
    assert _engines(tmp_path).recorded_pids() == []
    assert path.read_text() == f"{dead.pid} 1\n"
