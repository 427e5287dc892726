"""``make help`` lists every target once, as the Makefile defines it, in words a person reads:
it printed ``check that $(PYTHON) is Python 3.11+`` (the help text greps the Makefile, so a
variable in it came out unexpanded) and ran names of 11-17 characters into their text."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAKEFILE = ROOT / "Makefile"

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def _help(*args: str) -> list[str]:
    done = subprocess.run(
        ["make", "--no-print-directory", "-s", "-C", str(ROOT), "help", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.splitlines()


def _phony() -> set[str]:
    text = MAKEFILE.read_text().replace("\\\n", " ")
    return {name for line in re.findall(r"^\.PHONY:(.*)$", text, re.M) for name in line.split()}


def _defined() -> set[str]:
    return set(re.findall(r"^([a-z0-9-]+):(?!=)", MAKEFILE.read_text(), re.M))


def test_every_target_is_listed_once_and_every_listed_one_is_a_target() -> None:
    names = [line.split()[0] for line in _help()]
    assert len(names) == len(set(names)), names
    assert set(names) == _phony(), set(names) ^ _phony()
    assert set(names) <= _defined()


def test_no_make_variable_is_printed_unexpanded() -> None:
    lines = _help()
    assert not [line for line in lines if "$(" in line or "$$" in line]
    check = next(line for line in lines if line.split()[0] == "python-check")
    assert "python3 " in check  # the default PYTHON
    again = next(line for line in _help("PYTHON=python3.12") if "python-check" in line)
    assert "python3.12" in again
    odd = "/opt/r&d|x/bin/python3"  # sed's s|..|..| took & and | as its own (a review's repro)
    again = next(line for line in _help(f"PYTHON={odd}") if "python-check" in line)
    assert f"check that {odd} is" in again


def test_the_descriptions_start_in_one_column() -> None:
    lines = _help()
    starts = {len(line) - len(line.split(None, 1)[1]) for line in lines}
    assert len(starts) == 1, [line[:40] for line in lines]
