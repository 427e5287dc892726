"""The stack's port check: a port a just-killed process still holds is waited for, briefly; a port
another process keeps is refused naming the variable."""

from __future__ import annotations

import io
import socket
import threading
from pathlib import Path

import pytest

from services.tools.stack import lifecycle
from services.tools.stack.lifecycle import Stack, StackError
from services.tools.stack.service_table import service

ROOT = Path(__file__).resolve().parents[2]


def _held_port() -> tuple[socket.socket, int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock, int(sock.getsockname()[1])


def _stack(tmp_path: Path, port: int) -> Stack:
    env = {"MODEL_2_LISTEN": f"127.0.0.1:{port}"}
    return Stack(ROOT, tmp_path / "run", env, out=io.StringIO())


def test_a_port_released_within_the_wait_is_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lifecycle, "PORT_RELEASE_WAIT_S", 5.0)
    sock, port = _held_port()
    closer = threading.Timer(0.3, sock.close)
    closer.start()
    try:
        _stack(tmp_path, port)._check_port_free(service("model-2"))
    finally:
        closer.cancel()
        sock.close()


def test_a_port_still_held_after_the_wait_is_refused_naming_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lifecycle, "PORT_RELEASE_WAIT_S", 0.2)
    sock, port = _held_port()
    with (
        sock,
        pytest.raises(StackError, match=rf"MODEL_2_LISTEN=127.0.0.1:{port}: model-2 cannot") as e,
    ):
        _stack(tmp_path, port)._check_port_free(service("model-2"))
    # one listen variable alone leaves its callers at the old address: move the whole stack
    assert "make up FREE_PORTS=1" in str(e.value)
