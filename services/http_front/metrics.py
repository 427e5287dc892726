"""The HTTP front's metrics, by API (``anthropic`` / ``openai``) and route (the route's
pattern, e.g. ``/v1/models/{model}``: never the path itself):

- ``cachemesh_http_front_requests_total{api,route,status}`` (the HTTP status sent; for a
  stream that ends in an error event, that error's status, e.g. 529 for a replica lost
  mid-answer; 499 for a caller gone);
- ``cachemesh_http_front_request_duration_seconds{api,route}`` (a stream: until its end);
- ``cachemesh_http_front_requests_in_flight``;
- ``cachemesh_http_front_body_bytes_reading``: bytes of request bodies being read, as taken
  of ``HTTP_FRONT_BODY_BUDGET_BYTES`` (a body's ``Content-Length`` from before its first
  byte);
- ``cachemesh_http_front_body_budget_refusals_total{api}``: requests refused (529 / 503,
  retried by the SDKs) because their body found no room in that budget.

Each API's answer route's server failures (``SERVER_FAILURES``) and budget refusals are
exposed at 0 from the start, as the router's errors are: ``rate`` and ``increase`` see a
series' first count only as a step from a sample before it, so a 5xx series first exposed at
1 lost that answer to ``CachemeshHttpFrontErrors`` and the dashboard.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry

from services.common.metrics import LoopMetrics

# each API's answer route and the statuses of the front's own failures there
# (``errors.ApiError.status_for``: 500, 504, and overloaded: Anthropic's 529, OpenAI's 503)
SERVER_FAILURES = {
    ("anthropic", "/v1/messages"): ("500", "504", "529"),
    ("openai", "/v1/chat/completions"): ("500", "503", "504"),
}


class HttpFrontMetrics:
    def __init__(self, registry: CollectorRegistry, clock: Callable[[], float]) -> None:
        self.clock = clock
        m = LoopMetrics(registry)
        self._requests = m.counter(
            "cachemesh_http_front_requests",
            "HTTP requests answered, by API, route and status",
            ("api", "route", "status"),
        )
        self._duration = m.histogram(
            "cachemesh_http_front_request_duration_seconds",
            "HTTP requests, from arrival to the last byte of the answer",
            ("api", "route"),
        )
        self.in_flight = m.gauge(
            "cachemesh_http_front_requests_in_flight", "HTTP requests in progress"
        )()
        self.body_bytes = m.gauge(
            "cachemesh_http_front_body_bytes_reading",
            "bytes of request bodies being read, as taken of HTTP_FRONT_BODY_BUDGET_BYTES",
        )()
        self._budget_refusals = m.counter(
            "cachemesh_http_front_body_budget_refusals",
            "requests refused because their body found no room in HTTP_FRONT_BODY_BUDGET_BYTES",
            ("api",),
        )
        for (api, route), statuses in SERVER_FAILURES.items():  # at 0: see the docstring
            for status in statuses:
                self._requests(api, route, status)
            self._budget_refusals(api)

    def body_refused(self, api: str) -> None:
        self._budget_refusals(api).inc()

    def answered(self, api: str, route: str, status: int, began: float) -> None:
        self._requests(api, route, str(status)).inc()
        self._duration(api, route).observe(self.clock() - began)
