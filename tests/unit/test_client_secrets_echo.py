"""The client's command lines never echo a secret: a token or key given where a file's path
was expected, or after a flag that looks like a secret's (argparse echoed it as an
unrecognized argument, or took `--key` for `--key-file`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cachemesh import cli as ask_cli
from tests.unit.loadtest_cli import cli_env, run_cli  # noqa: F401 (cli_env: a fixture)

TOKEN = "Zq3xV9kLmN2pR7sT4uW8yA1bC5dE6fG0hJ"  # shaped as secrets.token_urlsafe makes them
API_KEY = "cm_Zq3xV9kLmN2pR7sT4uW8yA1bC5dE6fG0hJ"


pytestmark = pytest.mark.usefixtures("cli_env")


def test_an_admin_token_in_place_of_its_file_is_never_echoed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CACHEMESH_ADMIN_TOKEN_FILE", TOKEN)
    assert run_cli(tmp_path) == 2
    err = capsys.readouterr().err
    assert TOKEN not in err and "CACHEMESH_ADMIN_TOKEN_FILE" in err, err
    assert ask_cli.main(["admin", "stats"]) == 2
    err = capsys.readouterr().err
    assert TOKEN not in err and "CACHEMESH_ADMIN_TOKEN_FILE" in err, err


def test_a_missing_token_file_that_looks_like_a_path_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CACHEMESH_ADMIN_TOKEN_FILE", str(tmp_path / "admin-token"))
    assert run_cli(tmp_path) == 2
    assert str(tmp_path / "admin-token") in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["--key", API_KEY],  # argparse took it as --key-file
        [f"--key={API_KEY}"],
        ["--api-key", API_KEY],
        ["--api", API_KEY],  # an abbreviation of nothing secret: still never echoed
        ["--token", TOKEN],
    ],
)
def test_cachemesh_load_refuses_a_key_on_its_command_line_without_echoing_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    assert run_cli(tmp_path, *argv) == 2
    err = capsys.readouterr().err
    assert API_KEY not in err and TOKEN not in err, err
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["ask", "hi", "--api-key", API_KEY],
        ["ask", "--api-key", API_KEY, "hi"],
        ["--api-key", API_KEY, "ask", "hi"],  # the key would be taken for the subcommand
        ["ask", "hi", f"--api-key={API_KEY}"],
        ["admin", "--admin-token", TOKEN, "stats"],  # was taken as --admin-token-file
        ["ask", "hi", "--password", API_KEY],
    ],
)
def test_cachemesh_never_echoes_a_value_after_a_secret_looking_flag(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    try:
        code = ask_cli.main(argv)
    except SystemExit as exit_:
        code = exit_.code  # type: ignore[assignment]
    assert code == 2
    err = capsys.readouterr().err
    assert API_KEY not in err and TOKEN not in err, err


def test_a_tls_key_file_option_given_a_key_names_the_option_not_the_value(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert ask_cli.main(["--cert-file", "/no/such/c.pem", "--key-file", API_KEY, "ask", "q"]) == 2
    err = capsys.readouterr().err
    assert API_KEY not in err and "key file" in err, err
