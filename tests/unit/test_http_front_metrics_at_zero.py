"""The HTTP front's failure series exist at 0 from its start, as the router's do
(``RouterMetrics.known``): Prometheus's ``rate`` and ``increase`` see a series' first count
only as a step from a sample before it, so a 5xx series first exposed at 1 lost that answer
to ``CachemeshHttpFrontErrors`` and the dashboard's error panels (before: a fresh front
exposed no ``cachemesh_http_front_requests_total`` series at all, nor any
``..._body_budget_refusals_total``)."""

from __future__ import annotations

import time

import pytest

from services.common.metrics import new_registry
from services.http_front.metrics import HttpFrontMetrics


@pytest.mark.parametrize(
    ("api", "route", "statuses"),
    [
        ("anthropic", "/v1/messages", ("500", "504", "529")),
        ("openai", "/v1/chat/completions", ("500", "503", "504")),
    ],
)
def test_each_apis_server_failures_and_budget_refusals_are_exposed_at_zero(
    api: str, route: str, statuses: tuple[str, ...]
) -> None:
    registry = new_registry()
    HttpFrontMetrics(registry, time.perf_counter)
    for status in statuses:
        labels = {"api": api, "route": route, "status": status}
        assert registry.get_sample_value("cachemesh_http_front_requests_total", labels) == 0.0
    refused = registry.get_sample_value(
        "cachemesh_http_front_body_budget_refusals_total", {"api": api}
    )
    assert refused == 0.0
