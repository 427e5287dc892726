"""Prometheus metrics shared by every service: settings, registry, endpoint, bounded labels.

Each service builds one ``CollectorRegistry`` in its ``serve()`` (never the library's global
one), declares its instruments on it (``services/<name>/metrics.py``) and serves it at
``GET /metrics`` on ``<PREFIX>_METRICS_LISTEN`` (its own port, from ``.env``), a thread of
``prometheus_client``'s own. Label sets stay bounded: tenants beyond
``CACHEMESH_METRICS_MAX_TENANTS`` share the value ``other``; models, tiers, layers, status
codes and reasons come from closed sets; no request id and no free text is ever a label.

Written for cost on the request path: ``Children`` keeps each label combination's child
(``labels()`` validates and locks on every call), so a request pays a dict lookup and an
``inc`` / ``observe`` per metric.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Generic, TypeVar
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from services.common.env import ConfigError, Env

OTHER = "other"  # the tenant label of every tenant past the cap
NONE = "none"  # the tenant label of a request refused before it had one (no or unknown key)
MAX_TENANTS_VAR = "CACHEMESH_METRICS_MAX_TENANTS"
DEFAULT_MAX_TENANTS = 100

# seconds: from a 1 ms exact hit to a long model answer
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip


@dataclass(frozen=True)
class MetricsSettings:
    listen: str  # host:port of GET /metrics
    listen_var: str  # the variable it came from, named in errors
    max_tenants: int

    @classmethod
    def from_env(cls, env: Env, prefix: str, default_listen: str) -> MetricsSettings:
        """``<prefix>_METRICS_LISTEN`` (a second replica reads its own, renamed by the stack)."""
        var = f"{prefix}_METRICS_LISTEN"
        return cls(
            listen=env.address(var, default_listen),
            listen_var=var,
            max_tenants=env.int(MAX_TENANTS_VAR, DEFAULT_MAX_TENANTS, minimum=0),
        )


def new_registry() -> CollectorRegistry:
    """A registry of the process's own: its instruments, plus CPU, memory and Python."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


class MetricsEndpoint:
    """``GET /metrics`` of one registry on ``settings.listen``, served from a thread."""

    def __init__(self, settings: MetricsSettings, registry: CollectorRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        host, _, port = self.settings.listen.rpartition(":")
        try:
            self._server, self._thread = start_http_server(
                int(port), host.strip("[]"), registry=self.registry
            )
        except OSError as exc:
            raise ConfigError(
                f"{self.settings.listen_var}={self.settings.listen}: cannot serve the metrics "
                f"there ({exc.strerror or exc}); set {self.settings.listen_var} to a free port"
            ) from None

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        return int(self._server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


class TenantLabels:
    """A tenant's label value: itself for the first ``cap`` tenants seen, then ``other``.

    Called on the event loop only; it remembers the kept tenants, never the overflow (so a
    flood of tenants costs no memory here)."""

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._kept: dict[str, str] = {}

    def __call__(self, tenant: str) -> str:
        value = self._kept.get(tenant)
        if value is not None:
            return value
        if not tenant:
            return NONE
        if len(self._kept) >= self._cap:
            return OTHER
        self._kept[tenant] = tenant
        return tenant


M = TypeVar("M", Counter, Gauge, Histogram)


class Children(Generic[M]):
    """A labelled metric's children by label values, each made once (``labels()`` validates
    and takes a lock on every call; this is a dict lookup)."""

    def __init__(self, metric: M) -> None:
        self._metric: M = metric
        self._made: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        made = self._made.get(values)
        if made is None:
            made = self._made[values] = self._metric.labels(*values)
        return made
