"""``make up`` with the Gateway and the HTTP front on TLS (mutual TLS, as documented in .env):
the runner's own readiness check holds no TLS credentials, so it must read each service's
``GET /readyz`` on its plaintext metrics port, not dial the service port in plaintext, or
``up`` waits out its timeout and stops a stack that was serving."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from services.tools.stack.health import SERVING, UNREACHABLE, probe, probe_http
from services.tools.stack.lifecycle import Stack
from tests.certs import Authority

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
FAST = {"SIM_TIME_SCALE": "0", "CACHEMESH_GRACE_S": "1", "OTEL_TRACES_EXPORTER": "none"}


def test_up_sees_a_stack_serving_mutual_tls(tmp_path: Path) -> None:
    pki = Authority(tmp_path)
    server, client = pki.issue("server", server=True), pki.issue("client", server=False)
    tls = {
        "ROUTER_TLS_CERT_FILE": str(server.cert),
        "ROUTER_TLS_KEY_FILE": str(server.key),
        "ROUTER_TLS_CLIENT_CA_FILE": str(pki.ca),
        "HTTP_FRONT_TLS_CERT_FILE": str(server.cert),
        "HTTP_FRONT_TLS_KEY_FILE": str(server.key),
        "HTTP_FRONT_TLS_CLIENT_CA_FILE": str(pki.ca),
        "HTTP_FRONT_GATEWAY_TLS_CA_FILE": str(pki.ca),
        "HTTP_FRONT_GATEWAY_TLS_CERT_FILE": str(client.cert),
        "HTTP_FRONT_GATEWAY_TLS_KEY_FILE": str(client.key),
    }
    out = io.StringIO()
    stack = Stack.on_free_ports(ROOT, tmp_path / "run", {**FAST, **tls}, out=out)
    try:
        stack.start(timeout_s=120)
        health = {name: status for name, (_, status) in stack.status().items()}
        assert health == dict.fromkeys(health, SERVING), out.getvalue()
        assert {"router", "http-front"} <= set(health)
        # the service ports speak TLS only: a plaintext look at them sees nothing
        assert probe(stack.router_address, 1.0) == UNREACHABLE
        assert probe_http(stack.addresses["http-front"], 1.0) == UNREACHABLE
    finally:
        stack.stop()
