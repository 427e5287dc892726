"""``$(PYTHON)`` is checked (3.11+, venv) where make runs it: building the venv, ``keys``,
``python-check``. It was an order-only prerequisite of the venv, so every ``make up``, ``status``,
``demo`` ran its two Python start-ups (0.4 s each time where python3 is a pyenv shim) for a
Python none of them uses once the venv is built."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MISSING = "/no/such/dir/python3"  # a check of it would fail: its lines show where it runs

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def _dry_run(*args: str) -> list[str]:
    """The commands make would run (-n: none is run), with PYTHON a missing program."""
    done = subprocess.run(
        ["make", "-n", "-s", "--no-print-directory", "-C", str(ROOT), f"PYTHON={MISSING}", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.splitlines()


def _checks(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith(f"command -v {MISSING} ")]


def test_the_stack_targets_check_python_only_when_they_build_the_venv() -> None:
    run_dir = "RUN_DIR=/nonexistent/run"  # -n runs nothing; a run dir of no stack anyway
    for target in ("status", "up", "demo"):
        lines = _dry_run(target, run_dir)
        builds = any(f"{MISSING} -m venv" in line for line in lines)  # a stale venv
        assert bool(_checks(lines)) == builds, lines


def test_building_the_venv_checks_python_first() -> None:
    lines = _dry_run("-W", "pyproject.toml", "setup")  # as if pyproject.toml had changed
    venv = next(i for i, line in enumerate(lines) if line.startswith(f"{MISSING} -m venv"))
    check = lines.index(_checks(lines)[0])
    assert check < venv, lines


def test_python_check_and_keys_still_check_it() -> None:
    assert _checks(_dry_run("python-check"))
    assert _checks(_dry_run("keys", "RUN_DIR=/nonexistent/run"))
