"""The fair-queue bench refuses counts it cannot report on before it starts a stack: one
request (a p90 needs two) ended in a StatisticsError traceback after both phases had run."""

from __future__ import annotations

from typing import Any

import pytest

from services.tools.bench.fair_queue import __main__ as fair_queue
from services.tools.stack.lifecycle import Stack


class _Started(Exception):
    """The stack would have started."""


def _no_stack(*_: Any, **__: Any) -> None:
    raise _Started


@pytest.mark.parametrize("argv", [["--requests", "1"], ["--requests", "0"], ["--flood", "0"]])
def test_counts_it_cannot_report_on_are_refused_before_the_stack(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    monkeypatch.setattr(Stack, "on_free_ports", _no_stack)
    with pytest.raises(SystemExit) as exited:
        fair_queue.main(argv)
    assert exited.value.code == 2
    assert "--requests must be >= 2 (a p90 needs two) and --flood >= 1" in capsys.readouterr().err


def test_two_requests_go_on_to_the_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Stack, "on_free_ports", _no_stack)
    with pytest.raises(_Started):
        fair_queue.main(["--requests", "2"])
