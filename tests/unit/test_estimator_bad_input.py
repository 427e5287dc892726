"""Bad input to the offline estimator is refused with ``estimator: ...`` naming the line or the
flag, never a traceback."""

from __future__ import annotations

from pathlib import Path
from typing import IO, Any

import pytest

from cachemesh.loadtest.reqlog import MAX_LATENCY_MS, MAX_T_MS
from services.router.routing.model import CARD_PATH, RouterCard
from services.tools.estimator.cli import main

REQ = '{"model":"auto","maxTokens":10,"messages":[{"role":"ROLE_USER","content":[{"text":"hi"}]}]}'
BAD_LINES = {
    "nan_t_ms": '{"t_ms": NaN, "tenant": "a", "request": ' + REQ + "}",
    "infinite_t_ms": '{"t_ms": 1e999, "tenant": "a", "request": ' + REQ + "}",
    "bool_t_ms": '{"t_ms": true, "tenant": "a", "request": ' + REQ + "}",
    "not_an_object": "[1, 2]",
    "a_string": '"hello"',
    "request_null": '{"t_ms": 0, "tenant": "a", "request": null}',
    "request_a_string": '{"t_ms": 0, "tenant": "a", "request": "hello"}',
    "no_request": '{"t_ms": 0, "tenant": "a"}',
    "nested_too_deep": "[" * 100_000,  # was a RecursionError traceback
    "request_nested_too_deep": '{"t_ms": 0, "tenant": "a", "request": ' + "[" * 100_000,
    # past any clock's range: an int64 overflow traceback deep in the replay
    "huge_t_ms": '{"t_ms": 1e19, "tenant": "a", "request": ' + REQ + "}",
    "huge_latency_ms": '{"t_ms": 0, "latency_ms": 1e19, "tenant": "a", "request": ' + REQ + "}",
    "huge_ttft_ms": '{"t_ms": 0, "latency_ms": 1e19, "ttft_ms": 1e19, "tenant": "a", '
    '"request": ' + REQ + "}",
}


@pytest.mark.parametrize("name", sorted(BAD_LINES))
def test_a_malformed_log_line_is_named_not_a_traceback(tmp_path: Path, name: str) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text(f'{{"t_ms": 0, "tenant": "a", "request": {REQ}}}\n{BAD_LINES[name]}\n')
    with pytest.raises(SystemExit) as exited:
        main(["--log", str(path)])
    assert str(exited.value.code).startswith(f"estimator: {path}:2: ")


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--interval-ms", "nan"), ("--interval-ms", "inf"), ("--interval-ms", "-1"),
     ("--requests", "0"), ("--requests", "-3")],
)  # fmt: skip
def test_a_bad_workload_flag_is_named(flag: str, value: str) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--workload", "synthetic", flag, value])
    assert str(exited.value.code).startswith(f"estimator: {flag} must be")


def test_an_existing_out_file_is_refused_unless_forced(tmp_path: Path) -> None:
    """An earlier estimate was replaced without a word."""
    earlier = tmp_path / "est.json"
    earlier.write_text("an earlier estimate\n")
    args = ["--workload", "synthetic", "--requests", "2", "--out", str(earlier)]
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert str(exited.value.code) == (
        f"estimator: --out {earlier} exists: pass --force to replace it, or name another file"
    )
    assert earlier.read_text() == "an earlier estimate\n"
    main([*args, "--force"])
    assert earlier.read_text().startswith("{")


@pytest.mark.parametrize(
    ("item", "near"),
    [("SEMANTIC_CACHE_THRESHHOLD=0.99", "SEMANTIC_CACHE_THRESHOLD"),
     ("semantic_cache_threshold=0.99", "SEMANTIC_CACHE_THRESHOLD"),
     ("ROUTER_BUDGET_USD_PER_DAYS=1", "ROUTER_BUDGET_USD_PER_DAY")],
)  # fmt: skip
def test_a_set_key_no_service_reads_is_refused_naming_the_closest(
    capsys: pytest.CaptureFixture[str], item: str, near: str
) -> None:
    """A misspelt --set key was ignored: the what-if printed the baseline's figures."""
    with pytest.raises(SystemExit) as exited:
        main(["--workload", "synthetic", "--requests", "1", "--set", item])
    assert exited.value.code == 2
    key = item.partition("=")[0]
    said = capsys.readouterr()
    assert said.err.startswith(f"estimator: --set {key}: no service of the stack reads it")
    assert f"did you mean {near}?" in said.err
    assert not said.out  # no estimate


def test_a_made_up_set_key_is_refused() -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--workload", "synthetic", "--requests", "1", "--set", "XYZZY=1"])
    assert exited.value.code == 2


def test_a_set_key_a_service_reads_is_taken(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--workload", "synthetic", "--requests", "1", "--set", "SEMANTIC_CACHE_THRESHOLD=0.99"])
    assert "requests" in capsys.readouterr().out


def test_a_line_at_the_bounds_of_its_times_is_replayed(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text(
        f'{{"t_ms": 0, "tenant": "a", "request": {REQ}}}\n'
        f'{{"t_ms": {MAX_T_MS}, "latency_ms": {MAX_LATENCY_MS}, "ttft_ms": {MAX_LATENCY_MS}, '
        f'"tenant": "a", "request": {REQ}}}\n'
    )
    main(["--log", str(path)])  # no SystemExit


@pytest.mark.parametrize(
    ("out", "said"),
    [
        ("a-dir", "estimator: --out {path} is a directory: name a file"),
        ("/proc/cachemesh-nope/est.json", "estimator: --out: cannot write {path}:"),
    ],
)
def test_an_out_that_cannot_be_written_is_refused_before_the_replay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, out: str, said: str
) -> None:
    """Before: the replay ran, then an IsADirectoryError (--force on a directory) or a
    FileNotFoundError ('/proc/nope/x.json') traceback lost its estimate."""
    from services.tools.estimator import cli

    path = tmp_path / out if not out.startswith("/") else Path(out)
    if out == "a-dir":
        path.mkdir()

    def no_replay(*_: object, **__: object) -> None:
        raise AssertionError("the replay ran before --out was checked")

    monkeypatch.setattr(cli, "OfflineStack", no_replay)
    with pytest.raises(SystemExit) as exited:
        main(["--workload", "synthetic", "--requests", "2", "--out", str(path), "--force"])
    assert str(exited.value.code).startswith(said.format(path=path))


def test_a_router_card_not_calibrated_is_refused_as_the_router_refuses_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The card ``make fit-router`` writes (default_threshold 0.0, calibration unset): the
    estimate routed ``auto`` at 0.0 without a word, where the router now refuses to start."""
    shipped = RouterCard.load()
    body = {**shipped.body, "calibration": {"target": "unset: run make calibrate-router"}}
    fitted = RouterCard(shipped.weights_sha256, 0.0, body)
    monkeypatch.setattr(RouterCard, "load", classmethod(lambda cls, path=None: fitted))
    with pytest.raises(SystemExit) as exited:
        main(["--workload", "synthetic", "--requests", "2"])
    message = str(exited.value.code)
    assert message.startswith(f"estimator: router card {CARD_PATH} is not calibrated"), message
    assert "make calibrate-router" in message and "ROUTER_THRESHOLD" in message


@pytest.mark.parametrize(
    ("lines", "held"),
    [
        ("", "no request"),
        ("\n\n", "no request"),
        (f'{{"t_ms": 0, "tenant": "a", "warmup": true, "request": {REQ}}}\n', "only 1 warm-up"),
    ],
)
def test_a_log_with_no_measured_request_is_refused(tmp_path: Path, lines: str, held: str) -> None:
    """Before: an empty log (or a load run's interrupted in its warm-up) printed a table of
    0 requests, $0.0000 and "(0.0% saved)", exit 0."""
    path = tmp_path / "log.jsonl"
    path.write_text(lines)
    with pytest.raises(SystemExit) as exited:
        main(["--log", str(path)])
    assert str(exited.value.code).startswith(f"estimator: {path} holds {held}")


def test_ctrl_c_is_said_in_a_line_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: a Ctrl-C while the workload loaded or the replay ran was a KeyboardInterrupt
    traceback."""
    from services.tools.estimator import cli

    def interrupted(*_: object, **__: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "OfflineStack", interrupted)
    with pytest.raises(SystemExit) as exited:
        main(["--workload", "synthetic", "--requests", "2"])
    assert exited.value.code == 130
    assert capsys.readouterr().err == "estimator: interrupted (Ctrl-C): no estimate\n"


def test_an_out_write_cut_midway_leaves_the_earlier_estimate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: --force wrote over the earlier estimate in place, so a Ctrl-C (or a full disk)
    mid-write left half a JSON document."""
    earlier = tmp_path / "est.json"
    earlier.write_text('{"an": "earlier estimate"}\n')
    real_open = Path.open

    class CutMidway:
        """A file whose first write goes half way, then a Ctrl-C."""

        def __init__(self, handle: IO[str]) -> None:
            self._handle = handle

        def __enter__(self) -> CutMidway:
            return self

        def __exit__(self, *exc: object) -> None:
            self._handle.close()

        def write(self, data: str) -> int:
            self._handle.write(data[: len(data) // 2])
            raise KeyboardInterrupt

    def open_cut(self: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = real_open(self, mode, *args, **kwargs)
        return CutMidway(handle) if "w" in mode else handle

    monkeypatch.setattr(Path, "open", open_cut)
    with pytest.raises(SystemExit):
        main(["--workload", "synthetic", "--requests", "2", "--out", str(earlier), "--force"])
    monkeypatch.undo()
    assert earlier.read_text() == '{"an": "earlier estimate"}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["est.json"]  # no temporary file left


def test_a_log_that_is_not_utf8_text_is_named(tmp_path: Path) -> None:
    """A gzipped log was refused as "estimator: 'utf-8' codec can't decode byte 0x8b in
    position 1: invalid start byte": no file, no line, no hint."""
    import gzip

    path = tmp_path / "log.jsonl.gz"
    path.write_bytes(gzip.compress(f'{{"t_ms": 0, "tenant": "a", "request": {REQ}}}\n'.encode()))
    with pytest.raises(SystemExit) as exited:
        main(["--log", str(path)])
    assert str(exited.value.code) == (
        f"estimator: {path}:1: not UTF-8 text (a compressed log? decompress it first)"
    )
