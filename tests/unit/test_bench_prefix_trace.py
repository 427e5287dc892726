"""make bench-prefix's trace replay on a hand-made trace: the ideal, the keys outside tools
read, the replica's reuse as the engine computes it, and a clear error for a bad line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.tools.bench.prefix_cache import mooncake


def _trace(tmp_path: Path, rows: list[dict[str, object]]) -> Path:
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_replay_reports_hits_ttft_reasons_and_the_view_error(tmp_path: Path) -> None:
    # two requests sharing their first 512-token block, a second apart, then a cold one
    rows = mooncake.load_trace(
        _trace(
            tmp_path,
            [
                {"timestamp": 0, "input_length": 1024, "output_length": 10, "hash_ids": [1, 2]},
                {"timestamp": 1000, "input_length": 1024, "output_length": 10, "hash_ids": [1, 3]},
                {"timestamp": 1000, "input_length": 600, "output_length": 5, "hash_ids": [9, 8]},
            ],
        )
    )
    assert mooncake.ideal_hit_rate(rows) == round(512 / (1024 + 1024 + 600), 4)
    run = mooncake.simulate(rows, 2, "ttft", capacity_blocks=1000)
    assert {"replicas", "policy", "kv_hit_rate_tokens", "ttft_p50_s", "ttft_p99_s"} <= set(run)
    assert run["kv_hit_rate_tokens"] == mooncake.ideal_hit_rate(rows)  # the warm one went home
    assert run["route_reasons"] == {"ttft_cold": 2, "ttft_warm": 1}
    assert run["view_error_tokens"]["max"] == 0  # one router, one view: exact
    # the first prefill: 1,024 tokens at 25,000/s
    assert min(run["requests_per_replica"].values()) == 1
    assert run["ttft_p50_s"] == pytest.approx(round(1024 / mooncake.PREFILL_TPS, 3), abs=0.02)
    robin = mooncake.simulate(rows, 2, "round_robin", capacity_blocks=1000)
    assert robin["kv_hit_rate_tokens"] == 0  # the second request went to the other replica
    # one LRU cache: large enough, the ideal; 40 blocks still hold the shared 512-token head
    # (a prompt's tail is evicted first); none, nothing
    assert mooncake.pooled_lru_hit_rate(rows, 1000) == mooncake.ideal_hit_rate(rows)
    assert mooncake.pooled_lru_hit_rate(rows, 40) == mooncake.ideal_hit_rate(rows)
    assert mooncake.pooled_lru_hit_rate(rows, 0) == 0


def test_a_bad_line_names_the_file_and_line(tmp_path: Path) -> None:
    path = _trace(tmp_path, [{"timestamp": 0, "input_length": 16}])
    with pytest.raises(ValueError, match=r"trace.jsonl:1: expected a JSON object"):
        mooncake.load_trace(path)


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("", r"no request in the trace"),
        ("\n\n", r"no request in the trace"),
        ("not json\n", r":1: expected a JSON object"),
        ("[1, 2]\n", r":1: .*not a JSON object"),
        (
            '{"timestamp": "abc", "input_length": 100, "output_length": 1, "hash_ids": [1]}\n',
            r":1: .*timestamp must be a finite number",
        ),
        (
            '{"timestamp": NaN, "input_length": 100, "output_length": 1, "hash_ids": [1]}\n',
            r":1: .*timestamp must be a finite number",
        ),
        (
            '{"timestamp": -5, "input_length": 100, "output_length": 1, "hash_ids": [1]}\n',
            r":1: .*timestamp must be a finite number of ms >= 0",
        ),
        (
            '{"timestamp": 0, "input_length": -100, "output_length": 1, "hash_ids": [1]}\n',
            r":1: .*input_length must be an integer >= 0",
        ),
        (
            '{"timestamp": 0, "input_length": 100, "output_length": 1.5, "hash_ids": [1]}\n',
            r":1: .*output_length must be an integer >= 0",
        ),
        (
            '{"timestamp": 0, "input_length": 100, "output_length": 1, "hash_ids": 5}\n',
            r":1: .*hash_ids must be a list of integers",
        ),
        (
            '{"timestamp": 0, "input_length": 100, "output_length": 1, "hash_ids": ["a"]}\n',
            r":1: .*hash_ids must be a list of integers",
        ),
    ],
)
def test_a_trace_that_cannot_be_replayed_is_refused_naming_what(
    tmp_path: Path, text: str, said: str
) -> None:
    """Before: an empty trace replayed as KV hit 0.0% / TTFT 0.0 s, a NaN timestamp as TTFT
    nan, a negative length as TTFT -0.004 s (each exit 0); a string timestamp or an integer
    hash_ids a TypeError traceback."""
    path = tmp_path / "trace.jsonl"
    path.write_text(text)
    with pytest.raises(mooncake.TraceError, match=said):
        mooncake.load_trace(path)


def test_bench_prefix_refuses_a_bad_trace_before_the_replays_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``make bench-prefix TRACE=<file>``: a missing or bad trace is one line and exit 2, said
    before the tau-bench replays run (they take ~25 s), and no report is written."""
    from services.tools.bench.prefix_cache import __main__ as bench

    async def replays_must_not_run(*_: object) -> dict[str, object]:
        raise AssertionError("the replays ran before the trace was checked")

    monkeypatch.setattr(bench, "run", replays_must_not_run)
    out = tmp_path / "prefix.json"
    for trace in (tmp_path / "missing.jsonl", _trace(tmp_path, [])):
        code = bench.main(["--out", str(out), "--trace", str(trace)])
        err = capsys.readouterr().err
        assert code == 2
        assert err.startswith(f"bench-prefix: {trace}") and "Traceback" not in err
        assert not out.exists()


@pytest.mark.parametrize(
    "argv",
    [["--conversations", "0"], ["--conversations", "-1"], ["--capacity-blocks", "0"],
     ["--capacity-blocks", "-5"]],
)  # fmt: skip
def test_counts_below_one_are_refused_before_the_replays(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    """Before: --conversations 0 a ZeroDivisionError traceback after the replays,
    --conversations -1 a report of 199 conversations (a slice's [:-1]), --capacity-blocks 0
    or -5 a ValueError traceback after the tau-bench replays."""
    from services.tools.bench.prefix_cache import __main__ as bench

    trace = _trace(tmp_path, [{"timestamp": 0, "input_length": 16, "output_length": 1,
                               "hash_ids": [1]}])  # fmt: skip
    with pytest.raises(SystemExit) as exited:
        bench.main(["--out", str(tmp_path / "p.json"), "--trace", str(trace), *argv])
    assert exited.value.code == 2
    assert f"{argv[0]} must be >= 1, got {argv[1]}" in capsys.readouterr().err
