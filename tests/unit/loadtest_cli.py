"""What the unit tests of ``cachemesh-load``'s command line share: an environment with the
two tenants' keys and nothing else of the client's (``cli_env``, used by each such module as
``pytestmark = pytest.mark.usefixtures("cli_env")``), and a run against an address nothing
checks (``run_cli``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cachemesh.loadtest import cli


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CACHEMESH_API_KEY", "k")
    monkeypatch.setenv("CACHEMESH_KEY_B", "k2")
    for name in ("CACHEMESH_ADMIN_TOKEN_FILE", "CACHEMESH_ADMIN_TOKEN", "CACHEMESH_TLS",
                 "CACHEMESH_CA_FILE", "CACHEMESH_CERT_FILE", "CACHEMESH_KEY_FILE"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cli, "check_gateway", lambda target, tls=None: None)


def run_cli(tmp_path: Path, *extra: str, target: str = "127.0.0.1:1") -> int:
    args = ["--target", target, "--out", str(tmp_path / "r.json"), "--requests", "2"]
    return cli.main([*args, "--stack-config", str(stack_config(tmp_path)), *extra])


def stack_config(tmp_path: Path) -> Path:
    """The run's ``--stack-config``: ``none.env``, as a test wrote it, or empty (no setting:
    the report's stack empty); cachemesh-load refuses one that does not exist."""
    (config := tmp_path / "none.env").touch()  # an existing file is kept as it is
    return config
