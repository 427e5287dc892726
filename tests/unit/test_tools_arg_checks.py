"""The benches refuse numeric flags they cannot run with before anything starts (exit 2,
naming the flag): not a traceback after a stack was started, nor figures of nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.tools.bench.hit_cpu import __main__ as hit_cpu
from services.tools.bench.router import __main__ as bench_router

ROOT = Path(__file__).resolve().parents[2]


def _never(*args: object, **kwargs: object) -> object:
    raise AssertionError("the run started")


@pytest.mark.parametrize(
    ("module", "argv", "said"),
    [
        (hit_cpu, ["--requests", "0"], "--requests must be >= 1"),
        (hit_cpu, ["--rounds", "0"], "--rounds must be >= 1"),
        (bench_router, ["--requests", "0"], "--requests must be >= 1"),
        (bench_router, ["--interval-ms", "-1"], "--interval-ms must be >= 0"),
    ],
)
def test_a_flag_out_of_bounds_stops_the_bench_before_its_run(
    module: object,
    argv: list[str],
    said: str,
    tmp_path: object,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name in ("asyncio", "measure"):  # what each runs
        if hasattr(module, name):
            monkeypatch.setattr(module, name, _never if name == "measure" else None)
    monkeypatch.setattr(sys, "argv", ["bench", *argv, "--out", f"{tmp_path}/r.json"])
    with pytest.raises(SystemExit) as stopped:
        module.main()  # type: ignore[attr-defined]
    assert stopped.value.code == 2
    assert said in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--prompts", "0"], "--prompts must be >= 1"),  # a ZeroDivisionError traceback
        # before: speed-ups "measured" at a nan time scale, written, exit 0
        (["--time-scale", "nan"], "--time-scale must be a finite number > 0"),
    ],
)
def test_the_speculative_bench_refuses_a_flag_out_of_bounds(
    argv: list[str], said: str, tmp_path: Path
) -> None:
    # its __main__ runs on import: run as make bench-speculative does
    out = tmp_path / "r.json"
    ended = subprocess.run(
        [sys.executable, "-m", "services.tools.bench.speculative", *argv, "--out", str(out)],
        cwd=ROOT, env=os.environ, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert ended.returncode == 2, ended.stderr
    assert said in ended.stderr
    assert not out.exists()
