"""The README's journey on a stack that does not listen on the default ports: what a shell that
sourced ``demo-keys.env`` (``make demo``, the README's ``source`` step) dials is this stack,
never whatever holds 127.0.0.1:50051."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cachemesh.envfile import read_env_file
from services.tools.stack.ports import PORT_RANGE_VAR, read_moved
from tests.integration.harness import ROOT, RunningStack

pytestmark = pytest.mark.integration

BIN = ROOT / ".venv" / "bin"
SECRET_FILES = ("admin-token", "internal-token", "redis-password")  # in the run dir
_CLIENT_VARS = ("CACHEMESH_TARGET", "CACHEMESH_HTTP_URL", "CACHEMESH_API_KEY")


def _stackless_env() -> dict[str, str]:
    """This environment less every ``CACHEMESH_`` setting (a new terminal's names no stack), but
    the worker's ``CACHEMESH_FREE_PORT_RANGE``: a ``FREE_PORTS=1`` stack without it took its
    ports from the kernel's ephemeral range, free until its services bound them, where the
    other worker's servers bind port 0 (12-15 of 20,000 such binds landed on one of them)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CACHEMESH_")}
    if PORT_RANGE_VAR in os.environ:
        env[PORT_RANGE_VAR] = os.environ[PORT_RANGE_VAR]
    return env


def _shell(script: str) -> subprocess.CompletedProcess[str]:
    """``script`` in a bash whose environment names no stack (as a new terminal's)."""
    env = _stackless_env()
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


_SERVED = re.compile(r"(SEMANTIC_CACHE (?:exact|paraphrase)|PREFIX_CACHE|MODEL) ")


def _demo(stack: RunningStack) -> list[str]:
    """One ``python -m cachemesh.demo`` on ``stack``: the layer each request's line names."""
    keys = read_env_file(stack.stack.run_dir / "demo-keys.env")
    env = _stackless_env() | keys
    done = subprocess.run(
        [str(BIN / "python"), "-m", "cachemesh.demo"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if "cost=$" in line]
    served = [found.group(1) for line in lines if (found := _SERVED.search(line))]
    assert len(served) == len(lines) == 16, done.stdout
    return served


def test_a_second_demo_on_the_same_stack_shows_the_same_layers(stack: RunningStack) -> None:
    # A second `make demo` showed all 16 requests served by the semantic cache (13 exact,
    # 3 paraphrases, the agent's turns too), in 0.1 s, $0 and 100% saved: the demo asked in
    # the default namespace, and L1 kept the first run's answers (on disk, across make down).
    first, second = _demo(stack), _demo(stack)
    model = {"MODEL", "PREFIX_CACHE"}  # a model call, read from L2 or not

    def layers(served: list[str]) -> list[str]:
        return ["model" if layer in model else layer for layer in served]

    assert layers(second) == layers(first)
    assert layers(first).count("model") == 11  # L1: 2 exact repeats, 3 paraphrases
    # what the demo says stays warm: the prefix cache (L2), per tenant and model. The
    # second run's first agent turn reads the prompt the first run wrote
    assert second[0] == "PREFIX_CACHE", second


def _make(*args: str) -> subprocess.CompletedProcess[str]:
    env = _stackless_env()
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
        # the first up printed both demo API keys: none of the run dir's secrets is shown
        keys = read_env_file(run / "demo-keys.env")
        secrets = [keys["CACHEMESH_KEY_A"], keys["CACHEMESH_KEY_B"]]
        secrets += [(run / name).read_text().strip() for name in SECRET_FILES]
        assert all(len(s) >= 20 and s not in up.stdout + up.stderr for s in secrets)
        assert "demo API keys (generated)" in up.stdout  # where they are: said
        moved = read_moved(run)
        router = moved["ROUTER_LISTEN"]
        assert router != "127.0.0.1:50051"
        assert moved["HTTP_FRONT_GATEWAY_ADDR"] == router  # the callers moved with it
        assert read_env_file(run / "demo-keys.env")["CACHEMESH_TARGET"] == router
        span = os.environ.get(PORT_RANGE_VAR)
        if span:  # a test worker's own (tests/conftest.py): never the kernel's ephemeral ports
            low, high = (int(end) for end in span.split("-"))
            ports = [int(p) for v in moved.values() for p in re.findall(r"127\.0\.0\.1:(\d+)", v)]
            assert ports and all(low <= p <= high for p in ports), (span, moved)
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
    assert "CACHEMESH_TARGET" not in read_env_file(run / "demo-keys.env")  # nor names the ports


def test_make_demo_leaves_a_stack_it_did_not_start_running(tmp_path: Path) -> None:
    # `make up`, then `make demo` in the same checkout: the demo adopted the running stack,
    # then stopped it with its own `stack down`.
    where = f"RUN_DIR={tmp_path / 'run'}"
    try:
        assert _make("up", "FREE_PORTS=1", where).returncode == 0
        demo = _make("demo", where)
        assert demo.returncode == 0, demo.stdout + demo.stderr
        assert "requests in" in demo.stdout and "left running" in demo.stdout
        # left running: how to stop it, and that L2 goes cold only once it is down, are true
        words = " ".join(demo.stdout.split())  # the closing note is wrapped
        assert "; stop: " in demo.stdout and "make down; make reset-l2" in words
        status = _make("status", where)
        assert status.returncode == 0, status.stdout  # still up, every process SERVING
    finally:
        _make("down", where)
    alone = _make("demo", "FREE_PORTS=1", where)  # a demo of its own: stopped after
    assert alone.returncode == 0, alone.stdout + alone.stderr
    assert "stack stopped" in alone.stdout
    # it stopped the stack itself: no advice to stop it (up's "stop: ...", the closing note's
    # "make down; make reset-l2"), and the table says what its baseline is
    words = " ".join(alone.stdout.split())  # the closing note is wrapped
    assert "; stop: " not in alone.stdout and "make down;" not in words, alone.stdout
    assert "make reset-l2 then starts L2 cold" in words
    assert "\nbaseline: the same tokens" in alone.stdout
    after = _make("status", where)
    assert after.returncode != 0 and "STOPPED" in after.stdout  # no supervisor left


def _interrupted_demo(sig: signal.Signals, log: Path, *args: str) -> tuple[int, str]:
    """``make demo`` in a session of its own, ``sig`` sent to its process group (what Ctrl-C
    in a terminal does for INT) once the demo is sending; make's exit code and output."""
    env = _stackless_env()
    for name in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL"):
        env.pop(name, None)
    env |= {"CACHEMESH_GRACE_S": "1", "SIM_TIME_SCALE": "1.0"}  # the demo takes a while
    with log.open("w") as out:
        make = subprocess.Popen(
            ["make", "--no-print-directory", "demo", *args],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip
        try:
            give_up = time.monotonic() + 240
            while "turn 1:" not in log.read_text() and make.poll() is None:
                assert time.monotonic() < give_up, log.read_text()
                time.sleep(0.2)  # polling for the demo's first line, not timing a TTL
            assert make.poll() is None, log.read_text()
            os.killpg(make.pid, sig)
            code = make.wait(timeout=120)
        finally:
            if make.poll() is None:
                os.killpg(make.pid, signal.SIGKILL)
    text = log.read_text()
    assert "requests in" not in text, "the demo ended before the signal: nothing was tested"
    return code, text


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_make_demo_stopped_by_a_signal_stops_the_stack_it_started(
    tmp_path: Path, sig: signal.Signals
) -> None:
    # Ctrl-C during the demo: bash exited with its child killed by SIGINT before `stack
    # down`, and the whole stack it had started (7 processes, their ports) kept running.
    where = f"RUN_DIR={tmp_path / 'run'}"
    try:
        code, text = _interrupted_demo(sig, tmp_path / "demo.out", "FREE_PORTS=1", where)
        assert code != 0
        assert "stack stopped" in text, text
        after = _make("status", where)
        assert after.returncode != 0 and "STOPPED" in after.stdout, after.stdout
    finally:
        _make("down", where)


def test_make_demo_stopped_by_ctrl_c_leaves_a_stack_it_did_not_start_running(
    tmp_path: Path,
) -> None:
    where = f"RUN_DIR={tmp_path / 'run'}"
    try:
        # at the demo's pace (a command line's SIM_TIME_SCALE is exported over _make's 0)
        assert _make("up", "FREE_PORTS=1", "SIM_TIME_SCALE=1.0", where).returncode == 0
        code, text = _interrupted_demo(signal.SIGINT, tmp_path / "demo.out", where)
        assert code != 0 and "left running" in text, text
        status = _make("status", where)
        assert status.returncode == 0, status.stdout  # still up, every process SERVING
    finally:
        _make("down", where)
