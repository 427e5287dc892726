"""The HTTP front's metrics, by API (``anthropic`` / ``openai``) and route (the route's
pattern, e.g. ``/v1/models/{model}``: never the path itself):

- ``cachemesh_http_front_requests_total{api,route,status}`` (the HTTP status sent);
- ``cachemesh_http_front_request_duration_seconds{api,route}`` (a stream: until its end);
- ``cachemesh_http_front_requests_in_flight``.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.metrics import LATENCY_BUCKETS, Children


class HttpFrontMetrics:
    def __init__(self, registry: CollectorRegistry, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._requests = Children(
            Counter(
                "cachemesh_http_front_requests",
                "HTTP requests answered, by API, route and status",
                ["api", "route", "status"],
                registry=registry,
            )
        )
        self._duration = Children(
            Histogram(
                "cachemesh_http_front_request_duration_seconds",
                "HTTP requests, from arrival to the last byte of the answer",
                ["api", "route"],
                buckets=LATENCY_BUCKETS,
                registry=registry,
            )
        )
        self.in_flight = Gauge(
            "cachemesh_http_front_requests_in_flight",
            "HTTP requests in progress",
            registry=registry,
        )

    def answered(self, api: str, route: str, status: int, began: float) -> None:
        self._requests(api, route, str(status)).inc()
        self._duration(api, route).observe(self.clock() - began)
