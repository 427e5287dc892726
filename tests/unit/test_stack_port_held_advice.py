"""`make up` refusing a port someone holds says what to do. It said "another process (another
stack?) holds the port", though the default ports (50051-50056) lie in Linux's default ephemeral
range, where any program's outgoing connection may hold one as its source port (a client's, even
in TIME_WAIT with no server listening); the way out then is to reserve the ports or to move the
stack (FREE_PORTS=1), and ``ss`` names the holder."""

from __future__ import annotations

import io
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.tools.stack import lifecycle
from services.tools.stack.lifecycle import Stack, StackError
from services.tools.stack.ports import free_port
from services.tools.stack.service_table import service

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def held() -> Iterator[int]:
    """A port a listening socket holds."""
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        yield port


def _refusal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ephemeral: str, env: dict[str, str]
) -> str:
    """The refusal of model-2's port (``MODEL_2_LISTEN`` in ``env``) on a host whose ephemeral
    range file reads ``ephemeral``."""
    monkeypatch.setattr(lifecycle, "PORT_RELEASE_WAIT_S", 0.1)
    range_file = tmp_path / "ip_local_port_range"
    range_file.write_text(ephemeral)
    monkeypatch.setattr(lifecycle, "EPHEMERAL_RANGE_FILE", range_file)
    stack = Stack(ROOT, tmp_path / "run", env, out=io.StringIO())
    with pytest.raises(StackError) as refused:
        stack._check_port_free(service("model-2"))
    return str(refused.value)


def _reserved(message: str) -> set[int]:
    """The ports a ``sysctl -w net.ipv4.ip_local_reserved_ports=...`` in ``message`` reserves."""
    listed = message.split("net.ipv4.ip_local_reserved_ports=")[1].split(";")[0]
    ports: set[int] = set()
    for part in listed.split(","):
        first, _, last = part.partition("-")
        ports.update(range(int(first), int(last or first) + 1))
    return ports


def test_a_port_in_the_ephemeral_range_names_any_connection_and_the_ports_to_reserve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, held: int
) -> None:
    # model-2's port is held; model's is in the range too, the router's just past it
    low, high = held - 3, held + 3
    env = {
        "MODEL_2_LISTEN": f"127.0.0.1:{held}",
        "MODEL_LISTEN": f"127.0.0.1:{low}",
        "ROUTER_LISTEN": f"127.0.0.1:{high + 1}",
    }
    message = _refusal(tmp_path, monkeypatch, f"{low}\t{high}\n", env)
    assert "another stack?" not in message
    assert message.startswith(f"MODEL_2_LISTEN=127.0.0.1:{held}: model-2 cannot listen there")
    assert f"in this host's ephemeral range ({low}-{high})" in message
    assert "outgoing connection" in message
    assert f"ss -tanp 'sport = :{held}'" in message
    reserved = _reserved(message)
    assert {held, low} <= reserved and high + 1 not in reserved
    assert all(low <= port <= high for port in reserved)
    assert "make up FREE_PORTS=1" in message
    assert "\n" not in message


def test_a_port_outside_the_ephemeral_range_names_a_server_and_no_reservation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, held: int
) -> None:
    other = 65000 if held < 65000 else 1024
    env = {"MODEL_2_LISTEN": f"127.0.0.1:{held}"}
    message = _refusal(tmp_path, monkeypatch, f"{other} {other + 1}\n", env)
    assert "another stack?" not in message
    assert f"ss -tlnp 'sport = :{held}'" in message
    assert "ip_local_reserved_ports" not in message
    assert "make up FREE_PORTS=1" in message


def test_the_ports_to_reserve_are_listed_as_sysctl_takes_them() -> None:
    listed = lifecycle.port_list([50056, 50051, 50052, 50053, 50055, 9101, 50052])
    assert listed == "9101,50051-50053,50055-50056"
    assert lifecycle.port_list([50051]) == "50051"
