"""``make calibrate-cache`` / ``make calibrate-router``: a target that is not one is refused
at once (exit 2, the flag named), before the minutes of embedding every pair or prompt; not
after them, nor taken (a NaN or 1.5 precision, a 0 that would pass any operating point)."""

from __future__ import annotations

from typing import Any

import pytest

from services.tools.evaluation.router import __main__ as router_cli
from services.tools.evaluation.semantic_cache import __main__ as cache_cli


class _Embedded(Exception):
    """The Session was built: the embedding would have run."""


def _no_session(*_: Any, **__: Any) -> None:
    raise _Embedded


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--target", "1.5"], "--target must be a precision within (0, 1], got 1.5"),
        (["--target", "nan"], "--target must be a precision within (0, 1], got nan"),
        (["--target", "0"], "--target must be a precision within (0, 1], got 0.0"),
        (
            ["--target-for", "qqp_dev.csv=0.9"],
            "--target-for qqp_dev.csv=0.9: expected FILE=PRECISION with FILE one of",
        ),
        (
            ["--target-for", "gptcache_mock_data.csv=abc"],
            "--target-for gptcache_mock_data.csv=abc: 'abc' is not a number",
        ),
        (
            ["--target-for", "gptcache_mock_data.csv=-1"],
            "--target-for gptcache_mock_data.csv must be a precision within (0, 1], got -1.0",
        ),
        (["--min-threshold", "5"], "--min-threshold must be a cosine within [-1, 1], got 5.0"),
    ],
)
def test_calibrate_cache_refuses_a_target_before_embedding(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str], said: str
) -> None:
    """Before: 1.5 and nan ran the embeddings (>2 min on this machine) and went on; '=abc' a
    ValueError traceback after them."""
    monkeypatch.setattr(cache_cli, "Session", _no_session)
    assert cache_cli.main(["calibrate", *argv]) == 2
    assert said in capsys.readouterr().err


def test_calibrate_cache_with_good_targets_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_cli, "Session", _no_session)
    with pytest.raises(_Embedded):
        cache_cli.main(["calibrate", "--target", "0.99", "--target-for", "paws_wiki_dev.tsv=0.9"])


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--share", "1.5"], "--share must be within [0, 1]"),
        (["--share", "nan"], "--share must be within [0, 1]"),
        (["--quality", "nan"], "--quality must be within (0, 1]"),
        (["--quality", "0"], "--quality must be within (0, 1]"),
    ],
)
def test_calibrate_router_refuses_a_target_before_embedding(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str], said: str
) -> None:
    """Before: refused only after Session embedded all 7,629 prompts (minutes)."""
    monkeypatch.setattr(router_cli, "Session", _no_session)
    assert router_cli.main(["calibrate", *argv]) == 2
    assert said in capsys.readouterr().err
