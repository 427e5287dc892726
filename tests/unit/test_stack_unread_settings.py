"""``up`` names a setting of cachemesh's prefixes that nothing reads: a misspelled one.

``ROUTER_BUDGET_USD_PER_DAYS=0`` (for ``ROUTER_BUDGET_USD_PER_DAY``) started the stack without
a word and without the budget: 5 of 5 requests answered 200, where the right name refused
all 5 with 429. ``up`` now prints a warning naming it and the closest setting, before anything
starts; every name a service, tool or client reads is known, so none of those is warned of."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from services.common.setting_names import OWN_PREFIXES, unread_warning
from services.tools.stack import cli
from services.tools.stack.lifecycle import Stack, StackError
from services.tools.stack.service_table import known_env_keys, unread_settings
from tests.unit.test_unread_settings_warning import kubernetes_service_links

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _nothing_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    def start(self: Stack, timeout_s: float = 0.0) -> None:
        raise StackError("not started: a unit test")

    monkeypatch.setattr(Stack, "start", start)


def _up(root: Path) -> int:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--root", str(root), "--run-dir", str(root / ".run"), "up"])
    return int(exit_.value.code or 0)


def test_a_misspelled_budget_in_dotenv_is_named_with_the_setting_meant(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / ".env").write_text("ROUTER_BUDGET_USD_PER_DAYS=0\n")
    _up(tmp_path)
    err = capsys.readouterr().err
    assert "warning: ROUTER_BUDGET_USD_PER_DAYS" in err
    assert "did you mean ROUTER_BUDGET_USD_PER_DAY?" in err


def test_up_says_it_in_the_services_words_and_skips_kubernetes_links(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text("ROUTER_BUDGET_USD_PER_DAYS=0\n")
    for name, value in kubernetes_service_links().items():
        monkeypatch.setenv(name, value)
    _up(tmp_path)
    lines = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    said = unread_warning("ROUTER_BUDGET_USD_PER_DAYS", "ROUTER_BUDGET_USD_PER_DAY")
    assert said.startswith("ROUTER_BUDGET_USD_PER_DAYS is not a setting")  # the services' line
    assert lines == [
        "warning: "
        + unread_warning(
            "ROUTER_BUDGET_USD_PER_DAYS", "ROUTER_BUDGET_USD_PER_DAY", ".env or the environment"
        )
    ]


def test_a_misspelled_one_in_the_environment_is_named_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text("")
    monkeypatch.setenv("ROUTER_LIMIT_REQUEST_PER_MIN", "10")
    _up(tmp_path)
    assert "did you mean ROUTER_LIMIT_REQUESTS_PER_MIN?" in capsys.readouterr().err


def test_the_shipped_dotenv_and_others_variables_give_no_warning(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in os.environ:  # this test's own environment's (a developer's shell) left out
        if name.startswith(OWN_PREFIXES):
            monkeypatch.delenv(name)
    monkeypatch.setenv("OTHER_PROGRAMS_SETTING", "1")  # not one of cachemesh's prefixes
    monkeypatch.setenv("CACHEMESH_KEY_A", "cm_x")  # demo-keys.env's, sourced by a user
    _up(ROOT)
    assert "warning" not in capsys.readouterr().err


_PREFIXES = "|".join(OWN_PREFIXES)
_NAMED = re.compile(rf"""["'`]((?:{_PREFIXES})[A-Z0-9_]*[A-Z0-9])["'`]""")
_NOT_VARIABLES = {"HTTP_FRONT_GATEWAY"}  # a prefix its TLS settings are named from


def test_every_name_the_code_reads_is_known() -> None:
    """The known names stay complete: each quoted name of cachemesh's prefixes in the services'
    and the client's code (a variable read) is one, so a new setting is never warned of."""
    sources = [*(ROOT / "services").rglob("*.py"), *(ROOT / "clients" / "python").rglob("*.py")]
    named = {name for path in sources for name in _NAMED.findall(path.read_text())}
    assert "ROUTER_BUDGET_USD_PER_DAY" in named  # the pattern still finds them
    assert sorted(named - _NOT_VARIABLES - known_env_keys()) == []
    assert unread_settings(dict.fromkeys(named - _NOT_VARIABLES, "1")) == []
