"""TLS on real processes, with certificates made here: a router serving mutual TLS (its
certificate and key files, client certificates from one CA required) beside the session's
stack, the client and the CLI dialing it with a CA file and a client certificate, and an HTTP
front serving HTTPS (client certificates required too) that dials that router over mutual TLS.
A client without a certificate, with one from another CA, or in plaintext gets nothing."""

from __future__ import annotations

import http.client
import json
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cachemesh import Client, Tls, UnavailableError, build_request
from tests.certs import Authority, Issued
from tests.integration.extra_processes import loopback, post_message, process, service_env
from tests.integration.harness import ROOT, RunningStack

pytestmark = pytest.mark.integration


@dataclass
class Pki:
    ca: Path
    server: Issued
    client: Issued
    stranger: Issued  # a client certificate from another CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    authority = Authority(directory)
    other = Authority(directory, "another CA")
    return Pki(
        ca=authority.ca,
        server=authority.issue("server", server=True),
        client=authority.issue("client", server=False),
        stranger=other.issue("stranger", server=False),
    )


def _serving(address: str, credentials: grpc.ChannelCredentials) -> bool:
    with grpc.secure_channel(address, credentials) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def _credentials(pki: Pki, client: Issued | None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=None if client is None else client.key.read_bytes(),
        certificate_chain=None if client is None else client.cert.read_bytes(),
    )


@pytest.fixture(scope="module")
def router(
    stack: RunningStack, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    address = loopback()
    env = service_env(
        stack,
        "router",
        {
            "ROUTER_LISTEN": address,
            "ROUTER_TLS_CERT_FILE": str(pki.server.cert),
            "ROUTER_TLS_KEY_FILE": str(pki.server.key),
            "ROUTER_TLS_CLIENT_CA_FILE": str(pki.ca),
        },
    )
    log = tmp_path_factory.mktemp("tls") / "router.log"
    credentials = _credentials(pki, pki.client)
    with process("services.router", env, log, lambda: _serving(address, credentials)):
        assert "TLS, client certificates required" in log.read_text()
        yield address


def _tls(pki: Pki, client: Issued | None) -> Tls:
    return Tls(
        ca_file=pki.ca,
        cert_file=None if client is None else client.cert,
        key_file=None if client is None else client.key,
    )


def test_the_client_with_a_ca_file_and_its_certificate_is_answered(
    router: str, pki: Pki, stack: RunningStack
) -> None:
    with Client(router, api_key=stack.keys["tenant-a"], tls=_tls(pki, pki.client)) as client:
        answer = client.complete(
            build_request("Is this channel encrypted?", model="sim-small", max_tokens=8)
        )
    assert answer.content and answer.cost.baseline_nanos > 0


@pytest.mark.parametrize("who", ["no certificate", "another CA's certificate", "plaintext"])
def test_a_client_without_a_trusted_certificate_gets_nothing(
    router: str, pki: Pki, stack: RunningStack, who: str
) -> None:
    request = build_request("Let me in?", model="sim-small", max_tokens=8)
    key = stack.keys["tenant-a"]
    if who == "plaintext":
        channel = grpc.insecure_channel(router)
        client = Client(router, api_key=key, channel=channel, timeout_s=5)
    else:
        cert = None if who == "no certificate" else pki.stranger
        client = Client(router, api_key=key, tls=_tls(pki, cert), timeout_s=5)
    with client, pytest.raises(UnavailableError):
        client.complete(request)
    if who == "plaintext":
        channel.close()  # the caller's: the client leaves it open


def test_the_cli_takes_a_ca_file_and_a_client_certificate(
    router: str, pki: Pki, stack: RunningStack
) -> None:
    command = [
        sys.executable,
        "-m",
        "cachemesh.cli",
        "--target",
        router,
        "--ca-file",
        str(pki.ca),
        "--cert-file",
        str(pki.client.cert),
        "--key-file",
        str(pki.client.key),
        "ask",
        "What does the CLI print over TLS?",
        "--model",
        "sim-small",
        "--max-tokens",
        "8",
    ]
    env = {"PATH": "/usr/bin:/bin", "CACHEMESH_API_KEY": stack.keys["tenant-a"]}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "served_by: LAYER_" in done.stdout
    without = subprocess.run(
        command[:7] + command[11:], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )  # the CA file only: the router asks for a client certificate
    assert without.returncode == 1 and "UNAVAILABLE" in without.stderr


def test_the_load_tester_takes_the_clis_tls_settings_for_every_channel(
    router: str, pki: Pki, stack: RunningStack, tmp_path: Path
) -> None:
    """``cachemesh-load`` with the CLI's TLS settings: the health probe, both client
    processes and the billed totals (the admin token) all reach the mutual-TLS router."""
    out = tmp_path / "load.json"
    (tmp_path / "empty.env").touch()  # --stack-config: no setting
    command = [sys.executable, "-m", "cachemesh.loadtest", "--target", router, "--requests", "4",
               "--processes", "2", "--concurrency", "2", "--workload", "synthetic",
               "--out", str(out), "--stack-config", str(tmp_path / "empty.env")]  # fmt: skip
    env = {
        "PATH": "/usr/bin:/bin",
        "CACHEMESH_API_KEY": stack.keys["tenant-a"],
        "CACHEMESH_KEY_B": stack.keys["tenant-b"],
        "CACHEMESH_ADMIN_TOKEN_FILE": str(stack.stack.run_dir / "admin-token"),
        "CACHEMESH_CA_FILE": str(pki.ca),
        "CACHEMESH_CERT_FILE": str(pki.client.cert),
        "CACHEMESH_KEY_FILE": str(pki.client.key),
    }
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    doc = json.loads(out.read_text())
    assert doc["run"]["tls"] is True and doc["results"]["completed"] == 4
    assert doc["results"]["cost"]["billed"] is not None, doc["warnings"]


def _https(address: str, pki: Pki, client: Issued | None, key: str) -> tuple[int, dict[str, Any]]:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if client is not None:
        context.load_cert_chain(str(client.cert), str(client.key))
    status, _, body = post_message(f"https://{address}", key, "Hello over HTTPS?", context)
    return status, body


def _ready(address: str, pki: Pki) -> bool:
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(str(pki.client.cert), str(pki.client.key))
    try:
        with urllib.request.urlopen(f"https://{address}/readyz", timeout=1, context=context) as r:
            return bool(r.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def test_the_http_front_serves_https_and_dials_the_gateway_over_mutual_tls(
    router: str, pki: Pki, stack: RunningStack, tmp_path: Path
) -> None:
    front = loopback()
    env = service_env(
        stack,
        "http-front",
        {
            "HTTP_FRONT_LISTEN": front,
            "HTTP_FRONT_GATEWAY_ADDR": router,
            "HTTP_FRONT_TLS_CERT_FILE": str(pki.server.cert),
            "HTTP_FRONT_TLS_KEY_FILE": str(pki.server.key),
            "HTTP_FRONT_TLS_CLIENT_CA_FILE": str(pki.ca),
            "HTTP_FRONT_GATEWAY_TLS_CA_FILE": str(pki.ca),
            "HTTP_FRONT_GATEWAY_TLS_CERT_FILE": str(pki.client.cert),
            "HTTP_FRONT_GATEWAY_TLS_KEY_FILE": str(pki.client.key),
        },
    )
    key = stack.keys["tenant-a"]
    with process("services.http_front", env, tmp_path / "front.log", lambda: _ready(front, pki)):
        status, body = _https(front, pki, pki.client, key)
        assert status == 200, body
        assert body["type"] == "message" and body["content"]
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            _https(front, pki, None, key)  # no client certificate
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            _https(front, pki, pki.stranger, key)
        with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
            urllib.request.urlopen(f"http://{front}/healthz", timeout=5)  # plaintext


def test_a_router_with_a_bad_tls_setting_exits_naming_it(
    stack: RunningStack, pki: Pki, tmp_path: Path
) -> None:
    env = service_env(
        stack, "router", {"ROUTER_LISTEN": loopback(), "ROUTER_TLS_CERT_FILE": str(pki.server.cert)}
    )
    done = subprocess.run(
        [sys.executable, "-m", "services.router"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "ROUTER_TLS_CERT_FILE is set but ROUTER_TLS_KEY_FILE is not" in done.stderr
