"""docker-compose.yml's health check of a TLS Gateway (ROUTER_TLS_CERT_FILE/KEY_FILE, here with
client certificates required): it must see the router SERVING, or compose marks it unhealthy
and the HTTP front (depends_on: service_healthy) never starts. The check holds no TLS
credentials: it reads GET /readyz on the router's plaintext metrics port."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from services.tools.stack.health import UNREACHABLE, probe
from services.tools.stack.lifecycle import Stack
from services.tools.stack.ports import free_port
from services.tools.stack.service_table import service
from tests.certs import Authority
from tests.processes import stop_process

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _compose_healthcheck(ports: dict[str, int]) -> list[str]:
    """The router's health check in docker-compose.yml, on this test's ports (compose's port
    in the container -> this test's)."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    test: list[str] = compose["services"]["router"]["healthcheck"]["test"]
    assert test[0] == "CMD"
    check = [sys.executable if arg == "python" else arg for arg in test[1:]]
    for inside, here in ports.items():
        check = [arg.replace(f"127.0.0.1:{inside}", f"127.0.0.1:{here}") for arg in check]
    return check


def test_compose_healthcheck_sees_a_tls_router_serving(tmp_path: Path) -> None:
    pki = Authority(tmp_path)
    server = pki.issue("server", server=True)
    port, metrics_port = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    check = _compose_healthcheck({"50051": port, "9101": metrics_port})
    stack = Stack.on_free_ports(
        ROOT, tmp_path / "run", {"OTEL_TRACES_EXPORTER": "none"}, out=io.StringIO()
    )
    env = stack.environment(service("router"), stack.keys())
    env.update(
        ROUTER_LISTEN=address,
        ROUTER_METRICS_LISTEN=f"127.0.0.1:{metrics_port}",
        ROUTER_TLS_CERT_FILE=str(server.cert),
        ROUTER_TLS_KEY_FILE=str(server.key),
        ROUTER_TLS_CLIENT_CA_FILE=str(pki.ca),  # mutual TLS: no client certificate, no call
        ROUTER_ANSWERS_REDIS_URL="",  # standalone: no Redis needed
    )
    log_path = tmp_path / "router.log"
    with log_path.open("wb") as log:
        router = subprocess.Popen(
            [sys.executable, "-m", "services.router"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            result = subprocess.run(check, cwd=ROOT, capture_output=True, text=True, timeout=30)
            if result.returncode == 0:
                break
            assert router.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, f"health check says {result.stdout.strip()}"
            time.sleep(0.2)
        assert result.stdout.strip() == "SERVING"
        assert probe(address, 1.0) == UNREACHABLE  # the Gateway speaks TLS only
    finally:
        stop_process(router, 30)
    after = subprocess.run(check, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert after.returncode == 1  # a router that is gone is unhealthy
