"""``cachemesh-load`` on a stack whose Gateway went away mid-run: its requests waited for it
until --timeout (the client's wait_for_ready) and are counted DEADLINE_EXCEEDED or cut, their
time the timeout; the report says the Gateway no longer answers, so those figures are not
read as a slow stack."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cachemesh.loadtest import cli
from cachemesh.loadtest.load import NoGateway
from cachemesh.loadtest.samples import CUT, Sample
from tests.unit.loadtest_cli import cli_env, run_cli  # noqa: F401 (cli_env: a fixture)

pytestmark = pytest.mark.usefixtures("cli_env")


def _samples(*codes: str) -> list[Sample]:
    done = [Sample("q", "model", "OK", 0.0, 0.5, None, index=i) for i in range(3)]
    failed = [Sample("q", "error", c, 1.0, 10.0, None, index=3 + i) for i, c in enumerate(codes)]
    return [*done, *failed]


def _fake_run(monkeypatch: pytest.MonkeyPatch, samples: list[Sample], gone: bool) -> None:
    def run_load(*_: Any, **__: Any) -> list[Sample]:
        return samples

    probes: list[str] = []

    def check_gateway(target: str, tls: object = None) -> None:
        probes.append(target)
        if gone and len(probes) > 1:  # there before the run, gone at its end
            raise NoGateway(f"no Gateway at {target} (make up?)")

    monkeypatch.setattr(cli, "run_load", run_load)
    monkeypatch.setattr(cli, "check_gateway", check_gateway)


def _warnings(tmp_path: Path) -> list[str]:
    warnings: list[str] = json.loads((tmp_path / "r.json").read_text())["warnings"]
    return warnings


def test_a_gateway_gone_mid_run_is_said_beside_its_waited_out_requests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: a run whose router was stopped 6 s in reported 'DEADLINE_EXCEEDED: 24' (failed
    p50 10,002.7 ms at --timeout 10) and 'CUT_AT_DEADLINE: 8', and no word that the Gateway
    was gone: it read as a stack answering in 10 s."""
    _fake_run(monkeypatch, _samples("DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED", CUT), gone=True)
    assert run_cli(tmp_path, "--requests", "10") == 1
    said = [w for w in _warnings(tmp_path) if "no longer answers" in w]
    assert len(said) == 1
    assert "the 3 requests that ended CUT_AT_DEADLINE: 1, DEADLINE_EXCEEDED: 2" in said[0]
    assert "no Gateway at 127.0.0.1:1" in said[0]
    assert "the Gateway no longer answers" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("codes", "gone"),
    [
        (("DEADLINE_EXCEEDED",), False),  # still there: a slow answer is a slow answer
        (("INVALID_ARGUMENT",), True),  # answered: nothing waited for it
        ((), True),  # nothing failed
    ],
)
def test_nothing_is_said_when_no_request_waited_for_a_gateway_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, codes: tuple[str, ...], gone: bool
) -> None:
    _fake_run(monkeypatch, _samples(*codes), gone=gone)
    run_cli(tmp_path, "--requests", "10")
    assert not [w for w in _warnings(tmp_path) if "no longer answers" in w]
