"""The benches refuse numeric flags they cannot run with before anything starts (exit 2,
naming the flag): not a traceback after a stack was started, nor figures of nothing."""

from __future__ import annotations

import importlib
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


class _Unstarted:
    """Stands for what a bench starts its run with: any use of it fails the test."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"the run started ({name})")

    def __call__(self, *args: object, **kwargs: object) -> object:
        raise AssertionError("the run started (called)")


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--prompts", "0"], "--prompts must be >= 1"),  # a ZeroDivisionError traceback
        # before: speed-ups "measured" at a nan time scale, written, exit 0
        (["--time-scale", "nan"], "--time-scale must be a finite number > 0"),
        (["--fast-draft-c", "0"], "--fast-draft-c must be a finite number > 0"),
    ],
)
def test_the_speculative_bench_refuses_a_flag_out_of_bounds(
    argv: list[str],
    said: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from services.tools.bench.speculative import __main__ as speculative

    monkeypatch.setattr(speculative, "asyncio", _Unstarted())
    out = tmp_path / "r.json"
    with pytest.raises(SystemExit) as stopped:
        speculative.main([*argv, "--out", str(out)])
    assert stopped.value.code == 2
    assert said in capsys.readouterr().err
    assert not out.exists()


def test_importing_the_speculative_bench_runs_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    # its main ran on import (a module-level call): an import with a bad flag in sys.argv
    # exited 2, and one with none ran the whole bench and wrote bench-results/speculative.json
    monkeypatch.setattr(sys, "argv", ["bench", "--prompts", "0"])
    monkeypatch.delitem(sys.modules, "services.tools.bench.speculative.__main__", raising=False)
    module = importlib.import_module("services.tools.bench.speculative.__main__")
    assert callable(module.main)


def test_the_speculative_bench_still_runs_as_a_module(tmp_path: Path) -> None:
    # make bench-speculative's way (python -m): main runs, and refuses before its run
    out = tmp_path / "r.json"
    ended = subprocess.run(
        [sys.executable, "-m", "services.tools.bench.speculative", "--prompts", "0",
         "--out", str(out)],
        cwd=ROOT, env=os.environ, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert ended.returncode == 2, ended.stderr
    assert "--prompts must be >= 1" in ended.stderr
    assert not out.exists()


# (module, what its run starts with, argv, the refusal or None: the flag's value is valid)
_BOUNDS = [
    # 0 tenants: exit 0 with a report of empty figures
    ("l1_stats", "asyncio", ["--tenants", "0"], "--tenants must be >= 1, got 0"),
    ("l1_stats", "asyncio", ["--tenants", "10", "0"], "--tenants must be >= 1, got 0"),
    ("l1_stats", "asyncio", ["--name-chars", "12"], "--name-chars must be a finite number from 13"),
    ("l1_stats", "asyncio", ["--tenants", "1"], None),
    # -1: refused by the model service only once the stack had started (6.8 s)
    ("fair_queue.__main__", "Stack", ["--time-scale", "-1"], "--time-scale must be a finite"),
    ("fair_queue.__main__", "Stack", ["--time-scale", "nan"], "--time-scale must be a finite"),
    ("fair_queue.__main__", "Stack", ["--time-scale", "1001"], "from 0 to 1000, got 1001.0"),
    ("fair_queue.__main__", "Stack", ["--time-scale", "0"], None),  # no sleeps: valid
    # no change made: a StatisticsError traceback (exit 1) once the run was over
    ("key_reload", "tempfile", ["--changes", "0"], "--changes must be >= 1, got 0"),
    ("key_reload", "tempfile", ["--keys", "-1"], "--keys must be >= 0, got -1"),
    ("key_reload", "tempfile", ["--keys", "0"], None),  # the bench's own key only: a baseline
    # the HTTP path's bench took any count (bench.gateway refused 0 for the same plan)
    ("gateway.http_path", "compare", ["--requests", "0"], "--requests must be >= 1, got 0"),
    ("gateway.http_path", "compare", ["--requests", "-3"], "--requests must be >= 1, got -3"),
    ("gateway.http_path", "compare", ["--requests", "1"], None),
    # an index of 0 entries, after minutes of embedding; a negative start-up probe was off
    ("semantic_cache.__main__", "measure_verifier", ["--sizes", "0"], "--sizes must be >= 1"),
    ("semantic_cache.__main__", "measure_verifier", ["--sizes", "10", "-5"], "got -5"),
    ("semantic_cache.__main__", "measure_verifier", ["--startup-size", "-1"], "must be >= 0"),
    ("semantic_cache.__main__", "measure_verifier", ["--startup-size", "0"], None),  # off
    # a setting without its value: a ValueError traceback
    ("hit_cpu.__main__", "contextlib", ["--set", "CACHEMESH_LOG_LEVEL"], "expects NAME=VALUE"),
    ("hit_cpu.__main__", "contextlib", ["--set", "=WARNING"], "expects NAME=VALUE"),
    ("hit_cpu.__main__", "contextlib", ["--set", "CACHEMESH_LOG_LEVEL="], None),
]


@pytest.mark.parametrize(("module", "starts", "argv", "said"), _BOUNDS)
def test_a_bench_flag_is_checked_before_its_run(
    module: str,
    starts: str,
    argv: list[str],
    said: str | None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bench = importlib.import_module(f"services.tools.bench.{module}")
    monkeypatch.setattr(bench, starts, _Unstarted())
    monkeypatch.setattr(sys, "argv", ["bench", *argv])
    if said is None:
        with pytest.raises(AssertionError, match="the run started"):
            bench.main()
        return
    with pytest.raises(SystemExit) as stopped:
        bench.main()
    assert stopped.value.code == 2
    assert said in capsys.readouterr().err


def test_the_largest_sizes_search_half_the_queries_but_at_least_one() -> None:
    from services.tools.bench.semantic_cache import __main__ as semantic_bench

    # --queries 1 gave the million-entry size no probe at all: figures of nothing
    assert [semantic_bench._queries_at(1_000_000, q) for q in (1, 2, 200)] == [1, 1, 100]
    assert semantic_bench._queries_at(100_000, 1) == 1
