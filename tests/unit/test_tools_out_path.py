"""The tools refuse an output file they cannot write before their run, not after it
(make bench-prefix ran 4 minutes, then lost its results to a FileNotFoundError traceback)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.tools.bench.prefix_cache import __main__ as bench_prefix
from services.tools.bench.router import __main__ as bench_router
from services.tools.out_path import check_writable, check_writable_dir


def test_a_writable_path_is_accepted_and_nothing_is_left_there(tmp_path: Path) -> None:
    """The probe's directories are removed after it (3 of 3 refused runs left their --out's
    directory chain); the writers make them when they write."""
    out = tmp_path / "new" / "deeper" / "report.json"
    check_writable(out)
    assert list(tmp_path.iterdir()) == []
    kept = tmp_path / "kept.json"
    kept.write_text("earlier")
    check_writable(kept)
    assert kept.read_text() == "earlier"
    (tmp_path / "there").mkdir()
    check_writable(tmp_path / "there" / "r.json")
    check_writable_dir(tmp_path / "runs" / "deep")
    check_writable_dir(tmp_path / "there")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.json", "there"]
    assert list((tmp_path / "there").iterdir()) == []


def test_a_run_refused_after_the_out_check_leaves_no_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        bench_router.main(["--out", str(tmp_path / "L" / "deep" / "r.json"), "--requests", "0"])
    assert stopped.value.code == 2
    assert "--requests must be >= 1" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_path_is_refused_naming_the_flag(tmp_path: Path) -> None:
    (blocker := tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match=r"--out: cannot write .*a-file/r\.json"):
        check_writable(blocker / "r.json")
    with pytest.raises(ValueError, match="is a directory"):
        check_writable(tmp_path)
    with pytest.raises(ValueError, match=r"--out-dir: cannot write into .*a-file"):
        check_writable_dir(blocker)


@pytest.mark.parametrize("bench", [bench_prefix, bench_router])
def test_a_bench_with_an_unwritable_out_stops_before_its_run(
    tmp_path: Path,
    bench: object,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def never(*args: object, **kwargs: object) -> object:
        raise AssertionError("the run started")

    monkeypatch.setattr(bench, "asyncio", type("Never", (), {"run": staticmethod(never)}))
    (blocker := tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit) as stopped:
        bench.main(["--out", str(blocker / "r.json")])  # type: ignore[attr-defined]
    assert stopped.value.code == 2
    assert "--out: cannot write" in capsys.readouterr().err
