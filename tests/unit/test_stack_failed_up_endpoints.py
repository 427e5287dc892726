"""A failed ``make up`` leaves ``demo-keys.env`` naming no stack it did not start. ``up`` wrote
where its stack would listen (CACHEMESH_TARGET, CACHEMESH_HTTP_URL) before it started anything,
and a refusal (a port held) or a start that failed (the stack stopped) left those lines until
the next up or down: a shell that sourced the file dialled ports nothing of this stack held
(another program's, in the held-port case). Now a refusal before anything starts leaves the
file's addresses as it found them, a start that stops the stack drops them, and they are
written once every service is SERVING."""

from __future__ import annotations

import io
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from cachemesh.envfile import read_env_file
from services.tools.keys import ENDPOINT_VARS, ensure_keys
from services.tools.stack import lifecycle
from services.tools.stack.lifecycle import Stack, StackError

ROOT = Path(__file__).resolve().parents[2]
BEFORE = {"CACHEMESH_TARGET": "127.0.0.1:51201", "CACHEMESH_HTTP_URL": "http://127.0.0.1:51219"}


def _stack(run_dir: Path) -> Stack:
    return Stack.on_free_ports(ROOT, run_dir, out=io.StringIO())


@contextmanager
def _held(address: str) -> Iterator[None]:
    """``address`` (host:port) held by a listening socket: another program's."""
    host, _, port = address.rpartition(":")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, int(port)))
        sock.listen()
        yield


def _endpoints(run_dir: Path) -> dict[str, str]:
    held = read_env_file(run_dir / "demo-keys.env")
    return {name: held[name] for name in ENDPOINT_VARS if name in held}


@pytest.mark.parametrize("found", [BEFORE, {}], ids=["addresses", "none"])
def test_a_refused_up_leaves_the_addresses_as_it_found_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, found: dict[str, str]
) -> None:
    monkeypatch.setattr(lifecycle, "PORT_RELEASE_WAIT_S", 0.1)
    run_dir = tmp_path / "run"
    keys = ensure_keys(run_dir, found)  # an earlier up's addresses, or a down's none
    stack = _stack(run_dir)
    with _held(stack.router_address), pytest.raises(StackError, match="router cannot listen"):
        stack.start(timeout_s=5)
    assert _endpoints(run_dir) == found
    assert read_env_file(keys.demo_keys_file)["CACHEMESH_KEY_A"] == keys.key_for("tenant-a")


def test_a_start_that_fails_drops_the_addresses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process that exits before SERVING (here: the wait for SERVING fails at once) stops
    the whole stack: the file names none, neither the new addresses nor the ones it held."""
    run_dir = tmp_path / "run"
    ensure_keys(run_dir, BEFORE)
    stack = _stack(run_dir)
    started: list[str] = []

    def fail(*_: object) -> None:
        started.append("supervisor")
        raise StackError("router exited before it was SERVING (exit 1)")

    stopped: list[str] = []

    def stop(grace_s: float | None = None) -> list[str]:
        stopped.append("stop")
        return []

    monkeypatch.setattr(stack, "_start_supervisor", lambda keys, managed: None)
    monkeypatch.setattr(stack, "_wait_serving", fail)
    monkeypatch.setattr(stack, "stop", stop)
    with pytest.raises(StackError, match="before it was SERVING"):
        stack.start(timeout_s=5)
    assert started == ["supervisor"] and stopped == ["stop"]
    assert _endpoints(run_dir) == {}


def test_a_stack_that_serves_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "run"
    ensure_keys(run_dir, BEFORE)
    stack = _stack(run_dir)
    monkeypatch.setattr(stack, "_start_supervisor", lambda keys, managed: None)
    monkeypatch.setattr(stack, "_wait_serving", lambda managed, timeout_s: None)
    keys = stack.start(timeout_s=5)
    assert _endpoints(run_dir) == stack.client_endpoints() != BEFORE
    assert dict(keys.endpoints) == stack.client_endpoints()
