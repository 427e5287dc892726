"""The alert rules evaluated over synthetic series (``promql_eval``, as Prometheus would): each
fires on the story it is for, and stays silent on the callers' own faults; and the router
exposes at 0 from its start the series those rules and the dashboard rate, so that a series'
first event is counted (Prometheus's ``rate`` sees none on a series that first shows at 1)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from services.common.env import Env
from services.common.metrics import NONE, TenantLabels
from services.common.model_overrides import model_table_from_env
from services.common.models import ModelTable
from services.router.metrics import RouterMetrics
from tests.unit.promql_eval import Series, counter, evaluate, fires

RULES = Path(__file__).resolve().parents[2] / "services/observability/prometheus/alerts.yml"
MINUTES = 60


def _rule(name: str) -> dict[str, Any]:
    loaded = yaml.safe_load(RULES.read_text())
    (rule,) = [r for g in loaded["groups"] for r in g["rules"] if r.get("alert") == name]
    return dict(rule)


def _for_s(rule: dict[str, Any]) -> float:
    text = str(rule["for"])
    return float(text[:-1]) * {"s": 1, "m": 60, "h": 3600}[text[-1]]


def _fires(name: str, series: list[Series], at_min: int = MINUTES - 1) -> bool:
    rule = _rule(name)
    return fires(rule["expr"], _for_s(rule), series, at_min)


def _router(name: str, per_min: float, **labels: str) -> Series:
    return Series(name, {"job": "router", **labels}, counter(0, per_min, MINUTES))


def _gateway_story(deadline: str) -> list[Series]:
    """36 calls a minute, 35 of them cut DEADLINE_EXCEEDED by ``deadline``'s deadline."""
    return [
        _router("cachemesh_router_request_duration_seconds_count", 1, served_by="model"),
        _router("cachemesh_router_request_duration_seconds_count", 35, served_by="error"),
        _router("cachemesh_router_requests_total", 1, tenant="a", served_by="model"),
        _router(
            "cachemesh_router_errors_total",
            35,
            tenant="a",
            code="DEADLINE_EXCEEDED",
            deadline=deadline,
        ),
    ]


def test_gateway_errors_fire_when_the_routers_model_timeout_cuts_the_calls() -> None:
    assert _fires("CachemeshGatewayErrors", _gateway_story("router"))


def test_gateway_errors_stay_silent_when_the_callers_own_deadline_cuts_the_calls() -> None:
    assert not _fires("CachemeshGatewayErrors", _gateway_story("client"))


def test_gateway_errors_fire_on_unavailable_too() -> None:
    unavailable = _router("cachemesh_router_errors_total", 35, tenant="a", code="UNAVAILABLE")
    story = [*_gateway_story("client")[:3], unavailable]
    assert _fires("CachemeshGatewayErrors", story)


def _not_storing(skipped_per_min: float) -> list[Series]:
    """semantic-cache's write-ahead log failed: every cacheable Store refused UNAVAILABLE,
    misses go on; ``skipped_per_min`` answers a minute are uncacheable (counted skipped)."""
    cache = {"job": "semantic-cache", "tenant": "a"}
    series = [
        Series("cachemesh_semantic_cache_lookups_total", {**cache, "result": "miss"},
               counter(0, 10, MINUTES)),
        Series("cachemesh_semantic_cache_stores_total", {**cache, "outcome": "stored"},
               counter(100, 0, MINUTES)),
        _router("cachemesh_router_degraded_total", 9, dependency="semantic-cache",
                reason="UNAVAILABLE"),
    ]  # fmt: skip
    if skipped_per_min:
        series.append(
            Series("cachemesh_semantic_cache_stores_total", {**cache, "outcome": "skipped"},
                   counter(0, skipped_per_min, MINUTES))
        )  # fmt: skip
    return series


@pytest.mark.parametrize("skipped_per_min", [0, 1])
def test_not_storing_fires_though_some_answers_are_uncacheable(skipped_per_min: float) -> None:
    assert _fires("CachemeshSemanticCacheNotStoring", _not_storing(skipped_per_min))


def test_not_storing_stays_silent_while_answers_are_stored() -> None:
    series = _not_storing(1)
    series[1] = Series(series[1].name, series[1].labels, counter(100, 8, MINUTES))
    assert not _fires("CachemeshSemanticCacheNotStoring", series)


def _snapshots(failed_from_min: int, saved_until_min: int) -> list[Series]:
    """semantic-cache saving a snapshot a minute until ``saved_until_min``, each save failing
    from ``failed_from_min`` on (a full disk), its series at 0 from the start."""
    cache = {"job": "semantic-cache", "instance": "semantic-cache:9102"}
    saved = [float(min(m, saved_until_min)) for m in range(MINUTES)]
    failed = [float(max(0, m - failed_from_min + 1)) for m in range(MINUTES)]
    return [
        Series("cachemesh_semantic_cache_snapshot_seconds_count", cache, saved),
        Series("cachemesh_semantic_cache_snapshot_failures_total", cache, failed),
    ]


def test_snapshot_failing_fires_when_no_save_succeeds_any_more() -> None:
    assert _fires("CachemeshSemanticCacheSnapshotFailing", _snapshots(20, 19))


def test_snapshot_failing_stays_silent_on_a_failure_the_next_save_recovers_from() -> None:
    series = _snapshots(20, MINUTES)  # failures from 20 on, yet saves go on succeeding
    series[1] = Series(series[1].name, series[1].labels, [float(m >= 20) for m in range(MINUTES)])
    assert not _fires("CachemeshSemanticCacheSnapshotFailing", series)
    assert not _fires("CachemeshSemanticCacheSnapshotFailing", _snapshots(MINUTES, MINUTES))


def test_spans_dropped_fires_on_any_drop_a_stops_too_and_is_silent_without() -> None:
    """Any span dropped unexported, its reason carried; one dropped at a stop fires too when
    a scrape lands in the stop (a slow stop: the count is made in its last milliseconds, so
    most stops' figure is only in their log line), the next process's series starting at 0
    under the same instance; a service dropping none stays silent."""
    labels = {"job": "model", "instance": "model:9102"}

    def dropped(reason: str, values: Sequence[float | None]) -> Series:
        return Series("cachemesh_spans_dropped_total", {**labels, "reason": reason}, values)

    steady = [0.0] * MINUTES
    assert not _fires("CachemeshSpansDropped", [dropped("queue_full", steady)])
    burst = [0.0] * (MINUTES - 5) + [40.0] * 5
    assert _fires("CachemeshSpansDropped", [dropped("queue_full", burst)])
    # the stop's scrape shows 12, the process restarted shows 0 a minute later
    stop = [0.0] * (MINUTES - 6) + [12.0] + [0.0] * 5
    assert _fires("CachemeshSpansDropped", [dropped("shutdown", stop)])
    rule = _rule("CachemeshSpansDropped")
    assert "reason" in rule["annotations"]["summary"]


def test_a_series_that_first_shows_at_one_loses_that_event_to_increase() -> None:
    """Why the router creates its series at 0: one ejection 20 minutes in, exposed from then
    (at 1) or from the start (at 0)."""
    late = counter(1, 0, MINUTES, from_min=20)
    early: list[float | None] = [0.0 if m < 20 else 1.0 for m in range(MINUTES)]
    expr = _rule("CachemeshReplicaEjected")["expr"]
    for values, seen in ((late, False), (early, True)):
        series = [Series("cachemesh_router_replica_ejections_total", {"model": "m"}, values)]
        assert bool(evaluate(expr, series, 25 * 60)) is seen


# --- the series the router exposes from its start -------------------------------------------


def _table() -> ModelTable:
    return model_table_from_env(Env({}))


def _exposed(tenants: list[str], cap: int = 100) -> dict[str, float]:
    registry = CollectorRegistry()
    metrics = RouterMetrics(registry, TenantLabels(cap))
    table = _table()
    metrics.known(tenants, [table.models["sim-small"], table.models["sim-large"]])
    found: dict[str, float] = {}
    for line in generate_latest(registry).decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            found[name] = float(value)
    return found


def test_the_router_exposes_its_known_series_at_zero_from_the_start() -> None:
    exposed = _exposed(["tenant-a", "tenant-b"])
    want = [
        'cachemesh_router_requests_total{model="sim-small",served_by="model",tenant="tenant-a",'
        'tier="small"}',
        'cachemesh_router_requests_total{model="sim-large",served_by="prefix_cache",'
        'tenant="tenant-b",tier="large"}',
        'cachemesh_router_cost_nanos_total{served_by="semantic_cache",tenant="tenant-a"}',
        'cachemesh_router_cost_nanos_total{served_by="unanswered",tenant="tenant-b"}',
        'cachemesh_router_errors_total{code="UNAUTHENTICATED",deadline="",tenant="_none"}',
        'cachemesh_router_errors_total{code="UNAVAILABLE",deadline="",tenant="tenant-a"}',
        'cachemesh_router_errors_total{code="DEADLINE_EXCEEDED",deadline="router",'
        'tenant="tenant-b"}',
        'cachemesh_router_errors_total{code="DEADLINE_EXCEEDED",deadline="client",'
        'tenant="tenant-b"}',
        'cachemesh_router_replica_ejections_total{model="sim-large"}',
        'cachemesh_router_degraded_total{dependency="limits",reason="DEADLINE_EXCEEDED"}',
        'cachemesh_router_degraded_total{dependency="semantic-cache",reason="UNAVAILABLE"}',
    ]
    missing = [name for name in want if name not in exposed]
    assert missing == []
    assert all(exposed[name] == 0 for name in want)
    assert NONE == "_none"


def test_the_known_tenants_stay_within_the_cap() -> None:
    exposed = _exposed([f"t{i}" for i in range(10)], cap=3)
    tenants = {
        name.split('tenant="')[1].split('"')[0]
        for name in exposed
        if name.startswith("cachemesh_router_errors_total")
    }
    assert tenants == {"t0", "t1", "t2", "_other", "_none"}


def test_a_failed_call_counts_whose_deadline_it_was() -> None:
    registry = CollectorRegistry()
    metrics = RouterMetrics(registry, TenantLabels(10))
    metrics.failed("a", "DEADLINE_EXCEEDED", 1.0, routers_deadline=True)
    metrics.failed("a", "DEADLINE_EXCEEDED", 1.0)
    metrics.failed("a", "UNAVAILABLE", 1.0, routers_deadline=True)  # no deadline: no label
    name = "cachemesh_router_errors_total"
    for deadline, code in (("router", "DEADLINE_EXCEEDED"), ("client", "DEADLINE_EXCEEDED"),
                           ("", "UNAVAILABLE")):  # fmt: skip
        labels = {"tenant": "a", "code": code, "deadline": deadline}
        assert registry.get_sample_value(name, labels) == 1
