"""The stack runner on real processes: up, refuse a second up, down, and the failure paths."""

from __future__ import annotations

import io
import os
import re
import signal
import time
from pathlib import Path

import pytest

from services.tools.stack.health import SERVING, UNREACHABLE, probe
from services.tools.stack.lifecycle import Stack, StackError
from services.tools.stack.supervisor import read_state

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
FAST = {"SIM_TIME_SCALE": "0", "CACHEMESH_GRACE_S": "1", "OTEL_TRACES_EXPORTER": "none"}


def _stack(run_dir: Path, **overrides: str) -> Stack:
    return Stack.on_free_ports(ROOT, run_dir, {**FAST, **overrides}, out=io.StringIO())


def _alive(pid: int) -> bool:
    """Running, and not a zombie (an adopted process whose parent died is reaped by init,
    which in a container may never do it)."""
    try:
        os.kill(pid, 0)
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (ProcessLookupError, FileNotFoundError):
        return False
    return state != "Z"


def test_up_refuse_status_down(tmp_path: Path) -> None:
    stack = _stack(tmp_path / "run")
    keys = stack.start(timeout_s=180)
    try:
        assert keys.created and keys.api_keys_file.is_file()
        pids = {r.service.name: r.pid for r in stack.running()}
        assert set(pids) == {
            "router",
            "semantic-cache",
            "prefix-cache",
            "model",
            "model-2",
            "http-front",
            "redis",
        }
        assert {name: health for name, (_, health) in stack.status().items()} == dict.fromkeys(
            pids, SERVING
        )
        assert all((tmp_path / "run" / "logs" / f"{name}.log").is_file() for name in pids)
        # up again with one service gone and no supervisor: only that one is started
        supervisor = stack.supervisor_pid()
        assert supervisor is not None
        os.kill(supervisor, signal.SIGKILL)
        while _alive(supervisor) and stack.supervisor_pid() is not None:
            time.sleep(0.05)
        os.kill(pids["model-2"], signal.SIGKILL)
        again = Stack(ROOT, tmp_path / "run", stack.settings(), out=io.StringIO())
        again.start(timeout_s=180)
        now = {r.service.name: r.pid for r in again.running()}
        assert now["model-2"] != pids["model-2"]
        assert {k: v for k, v in now.items() if k != "model-2"} == {
            k: v for k, v in pids.items() if k != "model-2"
        }
        pids = now
    finally:
        stopped = stack.stop()
    assert sorted(stopped) == sorted(pids)
    assert not any(_alive(pid) for pid in pids.values())
    assert probe(stack.router_address, 0.5) == UNREACHABLE
    assert not list((tmp_path / "run" / "pids").iterdir())
    assert read_state(tmp_path / "run") == {}  # no restarts of the stopped stack in status
    # the plan, every process's environment (the internal token, the Redis password, the
    # caller's shell), stayed on disk after down
    assert not (tmp_path / "run" / "supervisor.json").exists()
    assert Stack(ROOT, tmp_path / "run", out=io.StringIO()).stop() == []  # idempotent


def test_a_service_that_dies_stops_the_stack_and_shows_its_log(tmp_path: Path) -> None:
    stack = _stack(tmp_path / "run", MODEL_REPLICAS="not-a-replica-list")
    with pytest.raises(StackError) as failure:
        stack.start(timeout_s=180)
    message = str(failure.value)
    # both read MODEL_REPLICAS: whichever exits first is the one the stack reports
    assert re.search(r"(router|http-front) exited with code 2 before it was SERVING", message)
    assert "MODEL_REPLICAS" in message  # the tail of its log names the bad variable
    assert stack.running() == []
    assert all(health == UNREACHABLE for _, health in stack.status().values())


def test_a_timeout_stops_everything(tmp_path: Path) -> None:
    stack = _stack(tmp_path / "run")
    with pytest.raises(StackError, match=r"not SERVING after 0s"):
        stack.start(timeout_s=0.01)
    assert stack.running() == []
    assert not list((tmp_path / "run" / "pids").iterdir())


def test_up_after_the_supervisor_died_refuses_settings_the_running_processes_lack(
    tmp_path: Path,
) -> None:
    # The supervisor killed (OOM, kill -9) left the processes running: `up` with a new daily
    # budget adopted them, said the stack was up, and the budget was never applied.
    stack = _stack(tmp_path / "run")
    stack.start(timeout_s=180)
    try:
        supervisor = stack.supervisor_pid()
        assert supervisor is not None
        os.kill(supervisor, signal.SIGKILL)
        while _alive(supervisor) and stack.supervisor_pid() is not None:
            time.sleep(0.05)
        pids = {r.service.name: r.pid for r in stack.running()}
        budget = {**stack.settings(), "ROUTER_BUDGET_USD_PER_DAY": "0"}
        changed = Stack(ROOT, tmp_path / "run", budget, out=io.StringIO())
        with pytest.raises(StackError) as refused:
            changed.start(timeout_s=180)
        assert "router: ROUTER_BUDGET_USD_PER_DAY" in str(refused.value)
        assert "make down" in str(refused.value)
        assert {r.service.name: r.pid for r in stack.running()} == pids  # nothing touched
        assert stack.supervisor_pid() is None
    finally:
        stack.stop()
