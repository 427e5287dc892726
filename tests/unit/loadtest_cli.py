"""What the unit tests of ``cachemesh-load``'s command line share: an environment with the
two tenants' keys and nothing else of the client's (``client_env``; ``cli_env`` with the
Gateway's health check faked too; each used by a module as
``pytestmark = pytest.mark.usefixtures("cli_env")``), and a run against an address nothing
checks (``run_cli``), and a fake Gateway served on loopback (``served``)."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cachemesh._channel import GATEWAY_SERVICE
from cachemesh.loadtest import cli
from cachemesh.v1 import gateway_pb2_grpc


def no_client_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The two tenants' keys and none of the client's other settings (the caller's shell's)."""
    monkeypatch.setenv("CACHEMESH_API_KEY", "k")
    monkeypatch.setenv("CACHEMESH_KEY_B", "k2")
    for name in ("CACHEMESH_ADMIN_TOKEN_FILE", "CACHEMESH_ADMIN_TOKEN", "CACHEMESH_TLS",
                 "CACHEMESH_CA_FILE", "CACHEMESH_CERT_FILE", "CACHEMESH_KEY_FILE"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def client_env(monkeypatch: pytest.MonkeyPatch) -> None:
    no_client_settings(monkeypatch)


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """``client_env``, and the Gateway "there" for runs faked or meant to reach nothing."""
    no_client_settings(monkeypatch)
    monkeypatch.setattr(cli, "check_gateway", lambda target, tls=None: None)


def run_cli(tmp_path: Path, *extra: str, target: str = "127.0.0.1:1") -> int:
    args = ["--target", target, "--out", str(tmp_path / "r.json"), "--requests", "2"]
    return cli.main([*args, "--stack-config", str(stack_config(tmp_path)), *extra])


def stack_config(tmp_path: Path) -> Path:
    """The run's ``--stack-config``: ``none.env``, as a test wrote it, or empty (no setting:
    the report's stack empty); cachemesh-load refuses one that does not exist."""
    (config := tmp_path / "none.env").touch()  # an existing file is kept as it is
    return config


@contextmanager
def served(servicer: gateway_pb2_grpc.GatewayServicer) -> Iterator[str]:
    """``servicer`` (with a SERVING health, which cachemesh-load asks before it runs) on
    loopback, on an event loop of its own in a thread (the runner owns the caller's): its
    address, the server stopped on leaving."""
    ready: queue.Queue[tuple[int, asyncio.AbstractEventLoop, asyncio.Event]] = queue.Queue()

    async def serve() -> None:
        server = grpc.aio.server()
        gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server)
        serving = health.aio.HealthServicer()
        await serving.set(GATEWAY_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(serving, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        stop = asyncio.Event()
        ready.put((port, asyncio.get_running_loop(), stop))
        await stop.wait()
        await server.stop(0)

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    port, loop, stop = ready.get(timeout=10)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(5)
