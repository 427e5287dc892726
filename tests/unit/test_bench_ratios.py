"""The bench's ratios and its printed table, from a hand-made results section (pure)."""

from __future__ import annotations

from typing import Any

from services.tools.bench.gateway import summary
from services.tools.bench.gateway.ratios import case_ratios
from services.tools.bench.gateway.runs import AGENT, EXACT, MIXED, SEMANTIC, UNRELATED

LEVELS = (1, 8, 32)


def _latency(p50: float, p99: float) -> dict[str, float]:
    return {"n": 300, "p50": p50, "p90": p99, "p95": p99, "p99": p99, "max": p99, "mean": p50}


def _echo(rps: float, p50: float) -> dict[str, Any]:
    return {
        "chain": {"name": "x", "request_bytes": 600, "reply_bytes": 600, "downstream_calls": 6},
        "levels": [
            {"concurrency": n, "throughput_rps": rps * n, "latency_ms": _latency(p50, 2 * p50)}
            for n in LEVELS
        ],
    }


def _row(
    level: int, rps: float, p50: float, layer: str, cpu: float | None = None
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "concurrency": level,
        "throughput_rps": rps,
        "requests": 300,
        "warmup_requests": 50 if layer == "semantic_cache" else 0,
        "errors": {},
        "served_by": {layer: 300},
        "latency_ms": {
            "all": _latency(p50 + 1, 4 * p50),
            "by_layer": {layer: _latency(p50, 3 * p50)},
        },
    }
    if cpu is not None:
        ms = {"router": cpu / 2, "semantic-cache": cpu / 2, "total": cpu}
        row["cpu"] = {"requests": 300, "resolution_ms": 10.0, "ms_per_request": ms}
    return row


def _results() -> dict[str, Any]:
    mixed = _row(8, 40.0, 90.0, "prefix_cache")
    mixed.update(
        cost={"saved_fraction": 0.5, "by_layer": {"prefix_cache": {"saved_nanos": 9}}},
        hit_rate={"semantic_cache": 0.2, "prefix_cache": 0.3},
        labels={"wrong": 1},
    )
    return {
        "references": {
            "echo_two_hops": _echo(1000.0, 1.0),
            "echo_miss_chain": {"agent": _echo(200.0, 5.0), "unrelated": _echo(250.0, 4.0)},
            "embedder": {
                "single": {"latency_ms": _latency(5.0, 9.0), "sentences_per_s": 200.0},
                "batched": {"batch": 32, "sentences_per_s": 400.0},
            },
        },
        "cases": {
            EXACT: [_row(n, 500.0, 2.0, "semantic_cache") for n in LEVELS],
            SEMANTIC: [_row(n, 100.0, 10.0, "semantic_cache") for n in LEVELS],
            AGENT: [_row(n, 50.0, 20.0, "prefix_cache", cpu=30.0) for n in LEVELS],
            UNRELATED: [_row(n, 20.0, 40.0, "model", cpu=60.0) for n in LEVELS],
            MIXED: mixed,
        },
        "tracing": {
            "receiver": {"spans_received": 5500, "requests_sent": 1100, "by_service": {"r": 5500}},
            "on": {
                EXACT: [_row(n, 400.0, 2.5, "semantic_cache") for n in LEVELS],
                AGENT: [_row(n, 45.0, 24.0, "prefix_cache", cpu=36.0) for n in LEVELS],
            },
        },
    }


def test_hits_are_divided_by_the_two_hop_echo_and_misses_by_their_own_chain() -> None:
    ratios = case_ratios(_results())
    exact = ratios[EXACT][1]  # 8 in flight: echo 8000 req/s, p50 1 ms, p99 2 ms
    assert (exact["echo"], exact["latency_of"]) == ("echo_two_hops", "semantic_cache")
    assert exact["throughput_vs_echo"] == 0.062 and exact["p50_vs_echo"] == 2.0
    assert exact["p99_vs_echo"] == 3.0
    agent = ratios[AGENT][2]  # 32 in flight: echo 6400 req/s, p50 5 ms
    assert agent["echo"] == "echo_miss_chain.agent" and agent["latency_of"] == "all"
    assert agent["throughput_vs_echo"] == round(50 / 6400, 3) and agent["p50_vs_echo"] == 4.2
    assert agent["cpu_ms_per_request"]["total"] == 30.0
    unrelated = ratios[UNRELATED][0]
    assert unrelated["echo"] == "echo_miss_chain.unrelated" and unrelated["p50_vs_echo"] == 10.25
    semantic = ratios[SEMANTIC][0]
    assert semantic["p50_vs_embedder_single"] == 2.0
    assert semantic["throughput_vs_embedder_batched"] == 0.25
    assert ratios[MIXED]["throughput_vs_echo"] == 0.005 and ratios[MIXED]["wrong_l1_hits"] == 1


def test_a_hit_case_without_hits_says_its_latency_is_of_all_requests() -> None:
    results = _results()
    results["cases"][EXACT][0]["latency_ms"]["by_layer"] = {"model": _latency(50.0, 60.0)}
    assert case_ratios(results)[EXACT][0]["latency_of"] == "all"


def test_tracing_is_the_traced_run_over_the_untraced_one_at_each_level() -> None:
    tracing = case_ratios(_results())["tracing"]
    assert tracing["spans_received"] == 5500 and tracing["spans_per_request"] == 5.0
    exact = tracing[EXACT][0]
    assert (exact["throughput_rps_off"], exact["throughput_rps_on"]) == (500.0, 400.0)
    assert exact["throughput_on_vs_off"] == 0.8 and exact["p50_on_vs_off"] == round(3.5 / 3, 3)
    agent = tracing[AGENT][2]
    assert agent["throughput_on_vs_off"] == 0.9
    assert (agent["cpu_ms_per_request_off"], agent["cpu_ms_per_request_on"]) == (30.0, 36.0)


def test_sections_skipped_against_a_running_stack_are_said_to_be() -> None:
    results = _results()
    skipped = {"skipped": "--target 127.0.0.1:50051: needs a stack the bench starts itself"}
    results["cases"][AGENT] = results["cases"][UNRELATED] = results["tracing"] = skipped
    ratios = case_ratios(results)
    assert ratios[AGENT] == ratios[UNRELATED] == ratios["tracing"] == skipped
    text = summary.render(results["references"], ratios)
    assert text.count("skipped: --target") == 3


def test_the_table_shows_every_case_level_reference_and_the_cpu_per_service() -> None:
    results = _results()
    text = summary.render(results["references"], case_ratios(results))
    for title in summary.TITLES.values():
        assert sum(line.startswith(title) for line in text.splitlines()) == 3 + (
            3 if title in (summary.TITLES[EXACT], summary.TITLES[AGENT]) else 0
        )
    assert "echo miss chain, agent" in text and "echo miss chain, unrelated" in text
    assert "spans received 5,500 (5.0 a request" in text
    assert "CPU ms per request, (c) agent misses" in text
    assert "CPU ms per request, (c2) unrelated misses" in text
    assert "\r" not in text
