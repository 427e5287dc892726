"""The offline estimator replays requests that overlapped in the log concurrently, on its
virtual clock: a prompt's prefix is readable only from its request's first token, its L1 entry
only from its answer's end, as live."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from cachemesh.loadtest.reqlog import LogError, LogRecord, read_log, write_log
from cachemesh.loadtest.samples import Sample
from cachemesh.loadtest.workloads import Item
from cachemesh.loadtest.workloads.base import TENANT_A, user
from cachemesh.v1 import gateway_pb2 as pb
from services.common.clock import ManualClock
from services.common.env import Env
from services.semantic_cache.embedder import Embedder, load_minilm_embedder
from services.semantic_cache.operating_point import OperatingPoint
from services.semantic_cache.settings import SemanticCacheSettings
from services.tools.estimator.offline import OfflineStack
from services.tools.estimator.replay import WhatIf, replay
from services.tools.stack.lifecycle import Stack

ROOT = Path(__file__).resolve().parents[2]
# a system prompt over sim-large's 1,024-token minimum cacheable prefix, marked for caching
SYSTEM = " ".join(f"Rule {i}: answer politely and cite the policy section {i}." for i in range(160))


@pytest.fixture(scope="module")
def settings() -> dict[str, str]:
    return Stack(ROOT, environ={}).settings()


def _agent(question: str) -> Item:
    system = pb.ContentBlock(text=SYSTEM)
    system.cache_control.SetInParent()
    request = pb.CompleteRequest(
        model="sim-large", max_tokens=200, system=[system], messages=[user(question)]
    )
    return Item("agent", TENANT_A, request)


@pytest.fixture(scope="module")
def minilm(settings: dict[str, str]) -> Embedder:
    """The real embedder the offline stack loads (its ORT threads the settings'), loaded once
    for the module, not once a stack: it holds no state between calls."""
    threads = SemanticCacheSettings.from_env(Env(settings), OperatingPoint.load()).ort_threads
    return load_minilm_embedder(threads=threads)


def _run(settings: dict[str, str], minilm: Embedder, records: list[LogRecord]) -> list[Sample]:
    stack = OfflineStack(settings, ManualClock(), embedder=minilm)
    return asyncio.run(replay(stack, records, WhatIf()))


def _bill(samples: list[Sample]) -> list[tuple[str, bool, bool]]:
    """(served_by, wrote the prefix, read the prefix) of each request."""
    return [(s.layer, s.cache_write_tokens > 0, s.cache_read_tokens > 0) for s in samples]


def test_two_overlapping_requests_both_write_the_prefix(
    settings: dict[str, str], minilm: Embedder
) -> None:
    """The second arrives before the first's first token: the provider had not cached the
    prefix yet when it looked it up, so both pay the write (the sequential replay had the
    second read it)."""
    records = [
        LogRecord(0.0, _agent("Where is my parcel?"), latency_ms=5000.0),
        LogRecord(100.0, _agent("Can I change my address?"), latency_ms=5000.0),
    ]
    assert _bill(_run(settings, minilm, records)) == [
        ("model", True, False),
        ("model", True, False),
    ]


def test_the_same_requests_one_after_the_other_write_then_read(
    settings: dict[str, str], minilm: Embedder
) -> None:
    records = [
        LogRecord(0.0, _agent("Where is my parcel?"), latency_ms=1000.0),
        LogRecord(2000.0, _agent("Can I change my address?"), latency_ms=1000.0),
    ]
    bill = _bill(_run(settings, minilm, records))
    assert bill == [("model", True, False), ("prefix_cache", False, True)]


def test_a_request_after_the_first_token_reads_what_it_wrote(
    settings: dict[str, str], minilm: Embedder
) -> None:
    """Streamed logs give the first token: the prefix is cached from there, not the end."""
    records = [
        LogRecord(0.0, _agent("Where is my parcel?"), latency_ms=5000.0, ttft_ms=200.0),
        LogRecord(1000.0, _agent("Can I change my address?"), latency_ms=5000.0),
    ]
    bill = _bill(_run(settings, minilm, records))
    assert bill == [("model", True, False), ("prefix_cache", False, True)]


def test_a_streamed_first_token_comes_one_delta_after_the_prefix_is_cached(
    settings: dict[str, str],
    minilm: Embedder,
) -> None:
    """A streamed run logs the first token its client saw: the replica reported its prefill
    (and the router committed the prefix) one delta's decode before it, 4 tokens of sim-large
    at 70 tokens/s (57 ms at SIM_TIME_SCALE 1). A request arriving in that window reads the
    prefix live; one before it still writes it."""
    first = LogRecord(0.0, _agent("Where is my parcel?"), latency_ms=5000.0, ttft_ms=200.0)
    within = LogRecord(170.0, _agent("Can I change my address?"), latency_ms=5000.0)
    before = LogRecord(120.0, _agent("Can I change my address?"), latency_ms=5000.0)
    assert _bill(_run(settings, minilm, [first, within])) == [
        ("model", True, False),
        ("prefix_cache", False, True),
    ]
    both_write = [("model", True, False), ("model", True, False)]
    assert _bill(_run(settings, minilm, [first, before])) == both_write


def test_an_identical_question_in_flight_waits_for_its_answer(
    settings: dict[str, str], minilm: Embedder
) -> None:
    """L1's single flight on the virtual clock: the twin waits on the first one's lease and is
    served its answer once stored (at the first one's logged end); a twin whose wait would
    outlast its lease waits (two lookups of up to SEMANTIC_CACHE_LEASE_WAIT_S) calls the model
    itself, as live."""
    q = "How do I reset my password?"
    ask = Item("faq", TENANT_A, pb.CompleteRequest(model="auto", max_tokens=200,
                                                   messages=[user(q)]))  # fmt: skip
    waited = [LogRecord(0.0, ask, latency_ms=3000.0), LogRecord(10.0, ask, latency_ms=3000.0)]
    assert [s.layer for s in _run(settings, minilm, waited)] == ["model", "semantic_cache"]
    over = {**settings, "SEMANTIC_CACHE_LEASE_WAIT_S": "1"}
    assert [s.layer for s in _run(over, minilm, waited)] == ["model", "model"]


def test_an_answer_longer_than_the_lease_keeps_it_on_the_virtual_clock(
    settings: dict[str, str], minilm: Embedder
) -> None:
    """The first answer takes 3 s, its lease's age limit is 1 s: the leader renews it on the
    virtual clock as live, so a twin waiting on it (and one arriving after 1 s) is served its
    answer; without the renewals both led a model call of their own."""
    q = "How do I reset my password?"
    ask = Item("faq", TENANT_A, pb.CompleteRequest(model="auto", max_tokens=200,
                                                   messages=[user(q)]))  # fmt: skip
    records = [
        LogRecord(0.0, ask, latency_ms=3000.0),
        LogRecord(10.0, ask, latency_ms=3000.0),
        LogRecord(1500.0, ask, latency_ms=3000.0),
    ]
    short = {**settings, "SEMANTIC_CACHE_LEASE_S": "1"}
    layers = [s.layer for s in _run(short, minilm, records)]
    assert layers == ["model", "semantic_cache", "semantic_cache"]


def test_the_log_timing_counts_records_without_an_end_and_overlaps() -> None:
    from services.tools.estimator.replay import log_timing

    item = _agent("x")
    records = [
        LogRecord(0.0, item, latency_ms=500.0),
        LogRecord(100.0, item, latency_ms=100.0),  # starts before the first ended
        LogRecord(600.0, item),  # after both: no end logged
        LogRecord(600.0, item, latency_ms=0.0),  # same start as the one before, which took none
    ]
    assert log_timing(records) == {"records": 4, "without_end": 1, "overlapping": 1}


def test_the_estimate_reports_a_log_without_ends(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An older log (no latency_ms) still replays, as one request at a time, and says so."""
    from services.tools.estimator.cli import main

    path, out = tmp_path / "old.jsonl", tmp_path / "est.json"
    with path.open("w") as handle:
        write_log(handle, [LogRecord(0.0, _agent("a")), LogRecord(5.0, _agent("b"))])
    main(["--log", str(path), "--out", str(out)])
    timing = json.loads(out.read_text())["source"]["timing"]
    assert timing == {"records": 2, "without_end": 2, "overlapping": 0}
    assert "2 of 2 records have no latency_ms" in capsys.readouterr().err


def test_the_logged_times_round_trip_and_bad_ones_are_named(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    records = [LogRecord(0.0, _agent("a"), 900.5, 120.0), LogRecord(5.0, _agent("b"))]
    with path.open("w") as handle:
        write_log(handle, records)
    assert [(r.t_ms, r.latency_ms, r.ttft_ms) for r in read_log(path)] == [
        (0.0, 900.5, 120.0),
        (5.0, None, None),
    ]
    line = '{"t_ms": 0, "tenant": "a", "request": {"model": "auto"}, %s}\n'
    for bad in ('"latency_ms": NaN', '"latency_ms": -1', '"latency_ms": true',
                '"ttft_ms": 5', '"latency_ms": 4, "ttft_ms": 5'):  # fmt: skip
        path.write_text(line.replace("%s", bad))
        with pytest.raises(LogError, match=r"log\.jsonl:1: (latency_ms|ttft_ms)"):
            list(read_log(path))
