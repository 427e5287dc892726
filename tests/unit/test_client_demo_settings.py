"""``python -m cachemesh.demo`` (``make demo``) dialling a Gateway that is not on loopback: it
crashed with a traceback (the client's plaintext refusal) and had no way to allow it or to use
TLS; it reads the settings ``cachemesh`` reads (CACHEMESH_TLS, CACHEMESH_CA_FILE, ...) and
CACHEMESH_INSECURE, and says one line naming them."""

from __future__ import annotations

from pathlib import Path

import pytest

from cachemesh import Tls
from cachemesh.demo.__main__ import connection, main
from services.tools.stack.ports import free_port
from tests.unit.test_client_cli import SETTINGS  # the command lines' TLS settings

REMOTE = "192.0.2.1:50051"  # TEST-NET-1: never dialled here


@pytest.fixture(autouse=True)
def environ(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CACHEMESH_KEY_A", "cm_key-a-never-shown")
    monkeypatch.setenv("CACHEMESH_KEY_B", "cm_key-b-never-shown")
    return monkeypatch


def test_a_remote_target_in_plaintext_is_one_line_naming_the_settings(
    environ: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    environ.setenv("CACHEMESH_TARGET", REMOTE)
    assert main() == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"demo: CACHEMESH_TARGET {REMOTE} is not loopback")
    assert "CACHEMESH_TLS=1" in err and "CACHEMESH_INSECURE=1" in err
    assert "never-shown" not in err


def test_the_settings_allow_a_remote_target(environ: pytest.MonkeyPatch) -> None:
    assert connection("127.0.0.1:50051") == (None, False)
    environ.setenv("CACHEMESH_INSECURE", "1")
    assert connection(REMOTE) == (None, True)
    environ.setenv("CACHEMESH_INSECURE", "0")
    environ.setenv("CACHEMESH_TLS", "yes")
    assert connection(REMOTE) == (Tls(), False)
    environ.delenv("CACHEMESH_TLS")
    environ.setenv("CACHEMESH_CA_FILE", "/etc/ca.pem")
    assert connection(REMOTE) == (Tls(ca_file="/etc/ca.pem"), False)


@pytest.mark.parametrize(
    ("name", "value", "said"),
    [
        ("CACHEMESH_INSECURE", "maybe", "CACHEMESH_INSECURE must be true or false"),
        ("CACHEMESH_TLS", "si", "CACHEMESH_TLS must be true or false"),
        ("CACHEMESH_CA_FILE", " ", "CACHEMESH_CA_FILE) is empty"),
    ],
)
def test_a_malformed_setting_is_one_line_naming_it(
    environ: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    name: str,
    value: str,
    said: str,
) -> None:
    environ.setenv("CACHEMESH_TARGET", REMOTE)
    environ.setenv(name, value)
    assert main() == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and said in err, err


def test_an_unreadable_ca_file_is_one_line(
    environ: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    environ.setenv("CACHEMESH_TARGET", REMOTE)
    environ.setenv("CACHEMESH_CA_FILE", str(tmp_path / "missing.pem"))
    assert main() == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot read the CA file" in err, err


def test_a_gateway_that_is_not_there_is_not_said_to_have_refused_a_request(
    environ: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing listens at the target: the demo said "the gateway at ... refused a request",
    as if one had answered; it says it could not connect, and what to check."""
    environ.setenv("CACHEMESH_TARGET", f"127.0.0.1:{free_port()}")
    assert main() == 1
    err = capsys.readouterr().err
    assert "refused a request" not in err and "could not connect to" in err, err
    assert "make up" in err and "never-shown" not in err
