"""``cachemesh ask`` against a port where nothing listens printed gRPC's UNAVAILABLE and
"retry with --request-id", as if the Gateway had failed the call: it says it could not
connect, where to look, and that the id is for once the Gateway is up."""

from __future__ import annotations

import pytest

from cachemesh.cli import main
from services.tools.stack.ports import free_port


@pytest.fixture
def closed_port() -> int:
    return free_port()  # a port just free: nothing listens there


def test_a_gateway_that_never_answered_gets_no_retry_advice(
    closed_port: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CACHEMESH_API_KEY", "k")
    for name in ("CACHEMESH_TLS", "CACHEMESH_CA_FILE", "CACHEMESH_CERT_FILE", "CACHEMESH_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    assert main(["--target", f"127.0.0.1:{closed_port}", "ask", "hi"]) == 1
    err = capsys.readouterr().err
    assert f"could not connect to 127.0.0.1:{closed_port}" in err, err
    assert "make status" in err and "retry with --request-id" not in err
    assert "(once it is up: --request-id " in err


def test_a_target_whose_name_does_not_resolve_is_said_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A misspelt host (``.invalid`` never resolves, RFC 6761): gRPC 1.85 says "errors
    resolving <target>: ...", which the CLI did not know, so it printed "retry with
    --request-id" as if the Gateway had failed the call."""
    monkeypatch.setenv("CACHEMESH_API_KEY", "k")
    for name in ("CACHEMESH_TLS", "CACHEMESH_CA_FILE", "CACHEMESH_CERT_FILE", "CACHEMESH_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    target = "no-such-gateway.invalid:50051"
    assert main(["--target", target, "--insecure", "ask", "hi"]) == 1
    err = capsys.readouterr().err
    assert f"could not connect to {target}" in err, err
    assert "make status" in err and "retry with --request-id" not in err
