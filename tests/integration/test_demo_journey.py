"""The README's journey on a stack that does not listen on the default ports: what a shell that
sourced ``demo-keys.env`` (``make demo``, the README's ``source`` step) dials is this stack,
never whatever holds 127.0.0.1:50051."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from cachemesh.envfile import read_env_file
from services.tools.stack.ports import read_moved
from tests.integration.harness import ROOT, RunningStack

pytestmark = pytest.mark.integration

BIN = ROOT / ".venv" / "bin"
_CLIENT_VARS = ("CACHEMESH_TARGET", "CACHEMESH_HTTP_URL", "CACHEMESH_API_KEY")


def _shell(script: str) -> subprocess.CompletedProcess[str]:
    """``script`` in a bash whose environment names no stack (as a new terminal's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CACHEMESH_")}
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def test_a_shell_that_sourced_the_demo_keys_dials_their_stack(stack: RunningStack) -> None:
    # The stack ran on other ports: `make demo` sent this install's API keys to
    # 127.0.0.1:50051 (another stack said UNAUTHENTICATED), as did `cachemesh ask`.
    assert stack.target != "127.0.0.1:50051"
    keys = stack.stack.run_dir / "demo-keys.env"
    done = _shell(
        f"set -a; source {keys}; set +a\n"
        f'echo "$CACHEMESH_TARGET $CACHEMESH_HTTP_URL"\n'
        f'CACHEMESH_API_KEY=$CACHEMESH_KEY_A {BIN}/cachemesh ask "Where is my parcel?"\n'
        f"{BIN}/cachemesh admin stats\n"  # the admin token goes to this stack's router too
        f"{BIN}/python -m cachemesh.demo\n"
    )
    assert done.returncode == 0, done.stderr
    first = done.stdout.splitlines()[0]
    assert first == f"{stack.target} http://{stack.addresses['http-front']}"
    assert "served_by:" in done.stdout and "hit rate" in done.stdout
    assert "requests in" in done.stdout  # the demo's table, from this stack


def _make(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CACHEMESH_")}
    env |= {"SIM_TIME_SCALE": "0", "CACHEMESH_GRACE_S": "1"}
    for name in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL"):
        env.pop(name, None)
    return subprocess.run(
        ["make", "--no-print-directory", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def test_make_up_free_ports_moves_the_whole_stack_and_the_targets_find_it(
    tmp_path: Path,
) -> None:
    # The README never said how to run beside another stack; moving one *_LISTEN at a time
    # left every caller dialling the defaults.
    run = tmp_path / "run"
    where = f"RUN_DIR={run}"
    try:
        up = _make("up", "FREE_PORTS=1", where)
        assert up.returncode == 0, up.stdout + up.stderr
        moved = read_moved(run)
        router = moved["ROUTER_LISTEN"]
        assert router != "127.0.0.1:50051"
        assert moved["HTTP_FRONT_GATEWAY_ADDR"] == router  # the callers moved with it
        assert read_env_file(run / "demo-keys.env")["CACHEMESH_TARGET"] == router
        status = _make("status", where)
        assert status.returncode == 0, status.stdout + status.stderr  # all SERVING, there
        assert f"router          {router}" in status.stdout
        again = _make("up", where)  # a second up finds it where it runs, and keeps it
        assert again.returncode == 0 and "already runs this stack" in again.stdout
        assert read_moved(run) == moved
    finally:
        down = _make("down", where)
    assert down.returncode == 0 and "stack stopped" in down.stdout
    assert not (run / "ports.env").exists()  # the next up listens where the settings say


def test_make_demo_leaves_a_stack_it_did_not_start_running(tmp_path: Path) -> None:
    # `make up`, then `make demo` in the same checkout: the demo adopted the running stack,
    # then stopped it with its own `stack down`.
    where = f"RUN_DIR={tmp_path / 'run'}"
    try:
        assert _make("up", "FREE_PORTS=1", where).returncode == 0
        demo = _make("demo", where)
        assert demo.returncode == 0, demo.stdout + demo.stderr
        assert "requests in" in demo.stdout and "left running" in demo.stdout
        status = _make("status", where)
        assert status.returncode == 0, status.stdout  # still up, every process SERVING
    finally:
        _make("down", where)
    alone = _make("demo", "FREE_PORTS=1", where)  # a demo of its own: stopped after
    assert alone.returncode == 0, alone.stdout + alone.stderr
    assert "stack stopped" in alone.stdout
    after = _make("status", where)
    assert after.returncode != 0 and "STOPPED" in after.stdout  # no supervisor left
