"""``cachemesh-load``'s channels: TLS as the ``cachemesh`` CLI takes it (its options and
``CACHEMESH_TLS*`` settings) on every channel of a run (the health probe, each client
process's, the Admin API's), a remote target in plaintext refused unless ``--insecure``, and
the admin token never sent in plaintext off loopback. A real gRPC server in this process
stands for the Gateway, with TLS (certificates made here) or without."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cachemesh.loadtest import billed, cli
from cachemesh.loadtest.samples import Sample
from cachemesh.loadtest.workloads import Item
from cachemesh.v1 import admin_pb2 as adm
from cachemesh.v1 import admin_pb2_grpc, gateway_pb2_grpc
from cachemesh.v1 import gateway_pb2 as pb
from tests.certs import Authority, Issued
from tests.unit.loadtest_cli import stack_config

SETTINGS = ("CACHEMESH_TLS", "CACHEMESH_CA_FILE", "CACHEMESH_CERT_FILE", "CACHEMESH_KEY_FILE")
KEY_A, KEY_B, ADMIN = "cm_tenant_a_SECRET", "cm_tenant_b_SECRET", "adm_SECRET"
REMOTE = "192.0.2.2:50051"  # TEST-NET-1: never dialled here


class Seen:
    """The authorization of every call the fake Gateway received, by method."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def add(self, method: str, context: Any) -> None:
        auth = dict(context.invocation_metadata()).get("authorization", "")
        self.calls.append((method, auth))


class FakeGateway(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, seen: Seen) -> None:
        self.seen = seen

    def Complete(self, request: pb.CompleteRequest, context: Any) -> pb.CompleteResponse:
        self.seen.add("Complete", context)
        return pb.CompleteResponse(
            stop_reason="end_turn", served_by=pb.LAYER_MODEL, request_id=request.request_id
        )


class FakeAdmin(admin_pb2_grpc.AdminServicer):
    def __init__(self, seen: Seen) -> None:
        self.seen = seen

    def GetStats(self, request: adm.GetStatsRequest, context: Any) -> adm.GetStatsResponse:
        self.seen.add("GetStats", context)
        return adm.GetStatsResponse(tenants=[adm.TenantStats(tenant="tenant-a")])


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Issued, Issued]:
    authority = Authority(tmp_path_factory.mktemp("pki"))
    return (
        authority.ca,
        authority.issue("server", server=True),
        authority.issue("client", server=False),
    )


def _gateway(
    credentials: grpc.ServerCredentials | None, address: str = "127.0.0.1:0"
) -> Iterator[tuple[Seen, str]]:
    seen = Seen()
    server = grpc.server(futures.ThreadPoolExecutor(8))
    gateway_pb2_grpc.add_GatewayServicer_to_server(FakeGateway(seen), server)  # type: ignore[abstract]
    admin_pb2_grpc.add_AdminServicer_to_server(FakeAdmin(seen), server)  # type: ignore[abstract]
    status = health.HealthServicer()
    status.set("cachemesh.v1.Gateway", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(status, server)
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    server.start()
    yield seen, address if address.startswith("unix:") else f"127.0.0.1:{port}"
    server.stop(None)


@pytest.fixture
def mutual_tls_gateway(pki: tuple[Path, Issued, Issued]) -> Iterator[tuple[Seen, str]]:
    """TLS only, a client certificate from the CA required."""
    ca, server, _ = pki
    credentials = grpc.ssl_server_credentials(
        [(server.key.read_bytes(), server.cert.read_bytes())],
        root_certificates=ca.read_bytes(),
        require_client_auth=True,
    )
    yield from _gateway(credentials)


@pytest.fixture
def plaintext_gateway() -> Iterator[tuple[Seen, str]]:
    yield from _gateway(None)


@pytest.fixture
def unix_socket_gateway() -> Iterator[tuple[Seen, str]]:
    with tempfile.TemporaryDirectory(prefix="cm-") as short:  # a socket's path: < 108 bytes
        yield from _gateway(None, f"unix:{short}/gateway.sock")


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*SETTINGS, "CACHEMESH_ADMIN_TOKEN_FILE", "CACHEMESH_KEY_A", "CACHEMESH_INSECURE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CACHEMESH_API_KEY", KEY_A)
    monkeypatch.setenv("CACHEMESH_KEY_B", KEY_B)
    monkeypatch.setenv("CACHEMESH_ADMIN_TOKEN", ADMIN)
    monkeypatch.setattr(billed, "POLL_S", 0.0)  # the fake's totals never move
    monkeypatch.setattr(billed, "QUIET_S", 0.0)


def _load(tmp_path: Path, target: str, *extra: str) -> int:
    args = ["--target", target, "--out", str(tmp_path / "r.json"), "--requests", "6"]
    return cli.main([*args, "--stack-config", str(stack_config(tmp_path)), *extra])


def test_a_mutual_tls_run_dials_every_channel_over_tls_each_client_process_too(
    tmp_path: Path, pki: tuple[Path, Issued, Issued], mutual_tls_gateway: tuple[Seen, str]
) -> None:
    """The CLI's TLS options reach the health probe, both client processes' channels and the
    Admin API's (billed totals): a Gateway that speaks TLS only answers all of them."""
    seen, target = mutual_tls_gateway
    ca, _, client = pki
    tls = ["--ca-file", str(ca), "--cert-file", str(client.cert), "--key-file", str(client.key)]
    assert _load(tmp_path, target, *tls, "--processes", "2", "--concurrency", "2") == 0
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["results"]["completed"] == 6 and doc["run"]["tls"] is True
    assert doc["results"]["cost"]["billed"] is not None  # read over TLS
    completes = [auth for method, auth in seen.calls if method == "Complete"]
    assert len(completes) == 6 and set(completes) <= {f"Bearer {KEY_A}", f"Bearer {KEY_B}"}
    assert ("GetStats", f"Bearer {ADMIN}") in seen.calls


def test_cachemesh_tls_on_never_sends_a_key_to_a_plaintext_gateway(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    plaintext_gateway: tuple[Seen, str],
) -> None:
    """``CACHEMESH_TLS=1``, which the ``cachemesh`` CLI honours: the handshake fails, nothing
    is sent (the API keys and the admin token went in cleartext), and the run is refused."""
    seen, target = plaintext_gateway
    monkeypatch.setenv("CACHEMESH_TLS", "1")
    assert _load(tmp_path, target) == 2
    assert f"no Gateway at {target} answers over TLS" in capsys.readouterr().err
    assert seen.calls == []


@pytest.mark.parametrize(
    ("name", "value", "said"),
    [
        ("CACHEMESH_TLS", "enabled", "CACHEMESH_TLS must be true or false"),
        ("CACHEMESH_CA_FILE", "", "--ca-file (env CACHEMESH_CA_FILE) is empty"),
        ("CACHEMESH_CA_FILE", "/nonexistent/ca.pem", "cannot read the CA file /nonexistent"),
    ],
)
def test_a_tls_setting_it_cannot_read_is_refused_before_the_run(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    plaintext_gateway: tuple[Seen, str],
    name: str,
    value: str,
    said: str,
) -> None:
    seen, target = plaintext_gateway
    monkeypatch.setenv(name, value)
    assert _load(tmp_path, target) == 2
    assert said in capsys.readouterr().err
    assert seen.calls == [] and not (tmp_path / "r.json").exists()


def _never_run(*_: object, **__: object) -> list[Sample]:
    raise AssertionError("the run started")


def test_a_remote_target_in_plaintext_is_refused_unless_insecure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "check_gateway", _never_run)
    monkeypatch.setattr(cli, "run_load", _never_run)
    assert _load(tmp_path, REMOTE, "--allow-non-loopback") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--target {REMOTE} is not loopback" in err
    assert "--insecure" in err and not (tmp_path / "r.json").exists()


def test_cachemesh_insecure_lets_a_remote_target_through_as_insecure_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The setting ``make demo`` reads, for ``cachemesh-load`` too (it was refused, exit 2)."""
    dialled: list[str] = []
    monkeypatch.setattr(cli, "check_gateway", lambda target, tls=None: dialled.append(target))
    monkeypatch.setattr(cli, "run_load", _answered)
    monkeypatch.setattr(billed, "AdminClient", _never_run)
    monkeypatch.setenv("CACHEMESH_INSECURE", "yes")
    assert _load(tmp_path, REMOTE, "--allow-non-loopback") == 0
    assert dialled == [REMOTE]
    monkeypatch.setenv("CACHEMESH_INSECURE", "perhaps")
    assert _load(tmp_path, REMOTE, "--allow-non-loopback", "--force") == 2


def test_a_unix_socket_target_is_local_for_the_run_and_the_billed_totals(
    tmp_path: Path, unix_socket_gateway: tuple[Seen, str]
) -> None:
    """A Unix socket stays on this host, as for the clients and ``cachemesh``
    (``_tls.cleartext_off_host``): no ``--allow-non-loopback`` needed, and the admin token is
    sent to read the billed totals. The load tester's own ``is_loopback`` refused the target
    (exit 2), and with ``--allow-non-loopback`` dropped the billed totals as plaintext off
    loopback."""
    seen, target = unix_socket_gateway
    assert _load(tmp_path, target) == 0
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["results"]["completed"] == 6 and doc["warnings"] == []
    assert doc["results"]["cost"]["billed"] is not None
    assert ("GetStats", f"Bearer {ADMIN}") in seen.calls


def _answered(
    target: str, keys: object, warmup: list[Item], plan: list[Item], *_: object,
    before_measured: Callable[[], None] = lambda: None, **__: object,
) -> list[Sample]:  # fmt: skip
    before_measured()
    return [Sample("s", "model", "OK", float(i), 0.1, None, index=i) for i in range(len(plan))]


def test_insecure_sends_the_keys_but_never_the_admin_token_in_plaintext_off_loopback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--insecure`` is for the tenant keys; the admin token (which ``source demo-keys.env``
    sets) is not read from the stack: the billed figures are skipped, with a warning."""
    dialled: list[str] = []
    monkeypatch.setattr(cli, "check_gateway", lambda target, tls=None: dialled.append(target))
    monkeypatch.setattr(cli, "run_load", _answered)
    monkeypatch.setattr(billed, "AdminClient", _never_run)
    assert _load(tmp_path, REMOTE, "--allow-non-loopback", "--insecure") == 0
    doc = json.loads((tmp_path / "r.json").read_text())
    assert dialled == [REMOTE] and doc["run"]["tls"] is False
    assert doc["results"]["cost"]["billed"] is None
    (warning,) = doc["warnings"]
    assert "never in plaintext to 192.0.2.2:50051" in warning
    err = capsys.readouterr().err
    assert warning in err and ADMIN not in err
