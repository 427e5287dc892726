"""``up --local-engine`` leaves no llama-server running when it fails: a .env that does not
parse is refused before any engine starts, and a stack that does not come up stops the
engines it started. The engines here are stand-ins (sleeping processes recorded as
llama-server replicas), so the test needs no build."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.tools.engine.servers import LlamaServers, Replica
from services.tools.stack import cli, processes
from services.tools.stack.lifecycle import Stack, StackError


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Each engine ``start`` spawns sleepers in place of llama-server, recorded as its
    replicas (pid files, children) so that ``LlamaServers.stop`` stops them as it would."""
    spawned: list[subprocess.Popen[bytes]] = []

    def start(self: LlamaServers, ports: list[int], timeout_s: float = 60.0) -> list[Replica]:
        for index, port in enumerate(ports, start=1):
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
            spawned.append(child)
            self._children.append(child)
            processes.write_pid(self._pid_path(index), child.pid)
            self.replicas.append(Replica(index, port, child.pid))
        return list(self.replicas)

    monkeypatch.setattr(LlamaServers, "start", start)
    monkeypatch.setenv("CACHEMESH_LLAMA_REPLICAS", "2")
    yield spawned
    for child in spawned:
        child.kill()
        child.wait(timeout=10)


def _up(root: Path) -> int:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--root", str(root), "--run-dir", str(root / ".run"), "up", "--local-engine"])
    return int(exit_.value.code or 0)


def test_a_malformed_env_file_starts_no_engine(
    tmp_path: Path, started: list[subprocess.Popen[bytes]], capsys: pytest.CaptureFixture[str]
) -> None:
    """The .env was read after the engines started, outside the step that stops them: two
    llama-servers stayed up, and the next ``make demo-local`` refused to start."""
    (tmp_path / ".env").write_text("this line is not KEY=VALUE\n")
    assert _up(tmp_path) == 1
    assert ".env" in capsys.readouterr().err
    running = [child.pid for child in started if child.poll() is None]
    assert running == [], f"engines left running: {running}"
    assert started == []  # refused before any engine started


def test_a_stack_that_does_not_come_up_stops_the_engines(
    tmp_path: Path, started: list[subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(self: Stack, timeout_s: float = 0.0) -> None:
        raise StackError("router exited before it was SERVING")

    monkeypatch.setattr(Stack, "start", fail)
    (tmp_path / ".env").write_text("A=1\n")
    assert _up(tmp_path) == 1
    assert len(started) == 2
    assert [child.pid for child in started if child.poll() is None] == []
    assert not list((tmp_path / ".run" / "pids").glob("llama-server-*.pid"))
