"""Prometheus metrics shared by every service: settings, registry, endpoint, bounded labels.

Each service builds one ``CollectorRegistry`` in its ``serve()`` (never the library's global
one), declares its instruments on it (``services/<name>/metrics.py``) and serves it at
``GET /metrics`` on ``<PREFIX>_METRICS_LISTEN`` (its own port, from ``.env``), on its own
event loop (aiohttp), with ``GET /readyz`` (200 while the service is ready: a gRPC service's
overall health is SERVING) in plaintext whatever the service port speaks, for health checks
such as compose's that hold no TLS client credentials. Label sets stay bounded: tenants beyond
``CACHEMESH_METRICS_MAX_TENANTS`` share the value ``other``; models, tiers, layers, status
codes and reasons come from closed sets; no request id and no free text is ever a label.

Written for cost on the request path: ``LoopMetrics`` holds each service's counters, gauges
and histograms as plain slots written on the event loop and turned into the exposition only
when scraped, so a request pays a dict lookup and an addition per metric.
"""

from __future__ import annotations

import itertools
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from services.common.env import ConfigError, Env

if TYPE_CHECKING:
    from services.common.tokens import Tokenizer

# Both start with "_", which no tenant's name may (keyfile.TENANT_PATTERN): a tenant called
# "other" or "none" keeps a series of its own.
OTHER = "_other"  # the tenant label of every tenant past the cap
NONE = "_none"  # the tenant label of a request refused before it had one (no or unknown key)
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
            max_tenants=env.count(MAX_TENANTS_VAR, DEFAULT_MAX_TENANTS),
        )


def new_registry() -> CollectorRegistry:
    """A registry of the process's own: its instruments, plus CPU, memory and Python."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


class MetricsEndpoint:
    """``GET /metrics`` of one registry on ``settings.listen``, served on the event loop.

    Not prometheus_client's own server: that one runs in a thread of its own, and a second
    Python thread in the process cost the router about 150 us of CPU per exact L1 hit in
    ``python -m services.tools.bench.hit_cpu`` (+12-16%), though it only waited in select();
    served by aiohttp on the service's loop, the scrape costs only while it runs.
    """

    def __init__(
        self,
        settings: MetricsSettings,
        registry: CollectorRegistry,
        ready: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        """``ready``: what ``GET /readyz`` answers (``run_service`` binds a gRPC service's
        health when none is given); without it there is no ``/readyz``."""
        self.settings = settings
        self.registry = registry
        self.ready = ready
        self._runner: web.AppRunner | None = None
        self.port = 0  # the port bound, once started (the one asked, or a free one for 0)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        if self.ready is not None:
            app.router.add_get("/readyz", self._readyz)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        host, _, port = self.settings.listen.rpartition(":")
        site = web.TCPSite(runner, host.strip("[]"), int(port))
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise ConfigError(
                f"{self.settings.listen_var}={self.settings.listen}: cannot serve the metrics "
                f"there ({exc.strerror or exc}); set {self.settings.listen_var} to a free port"
            ) from None
        self._runner = runner
        self.port = int(runner.addresses[0][1])

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def _readyz(self, request: web.Request) -> web.Response:
        ready = self.ready is not None and await self.ready()
        return web.Response(
            text="SERVING\n" if ready else "NOT_SERVING\n", status=200 if ready else 503
        )

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


class TenantLabels:
    """A tenant's label value: itself for the first ``cap`` tenants seen, then ``_other``.

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


class LoopCounter:
    """A counter (or, with ``set`` / ``dec``, a gauge) written on the event loop only."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = value


class LoopHistogram:
    """Bucket counts (``le``: the value is at most the bound) and a sum, on the loop only."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


C = TypeVar("C", bound=LoopCounter | LoopHistogram)


class Family(Generic[C]):
    """A metric's children by label values, each made on first use."""

    def __init__(
        self, name: str, documentation: str, labels: Sequence[str], kind: str, make: Callable[[], C]
    ) -> None:
        self.name, self.documentation, self.kind = name, documentation, kind
        self.labels = tuple(labels)
        self._make: Callable[[], C] = make
        self.children: dict[tuple[str, ...], C] = {}
        if not self.labels:
            self.children[()] = make()  # an unlabelled metric is exposed from the start

    def __call__(self, *values: str) -> C:
        child = self.children.get(values)
        if child is None:
            if len(values) != len(self.labels):
                raise ValueError(f"{self.name} takes labels {self.labels}, got {values}")
            child = self.children[values] = self._make()
        return child

    def export(self) -> Metric:
        children = list(self.children.items())  # the loop may add one meanwhile
        labels = list(self.labels)
        if self.kind == "histogram":
            histogram = HistogramMetricFamily(self.name, self.documentation, labels=labels)
            for values, bucketed in children:
                assert isinstance(bucketed, LoopHistogram)
                counts, total = list(bucketed.counts), bucketed.sum  # copied first: one moment
                cumulative = [float(n) for n in itertools.accumulate(counts)]
                bounds = [*(_le(b) for b in bucketed.bounds), "+Inf"]
                histogram.add_metric(
                    list(values), list(zip(bounds, cumulative, strict=True)), total
                )
            return histogram
        if self.kind == "gauge":
            gauge = GaugeMetricFamily(self.name, self.documentation, labels=labels)
            for values, level in children:
                assert isinstance(level, LoopCounter)
                gauge.add_metric(list(values), level.value)
            return gauge
        counter = CounterMetricFamily(self.name, self.documentation, labels=labels)
        for values, count in children:
            assert isinstance(count, LoopCounter)
            counter.add_metric(list(values), count.value)
        return counter


def _le(bound: float) -> str:
    return repr(float(bound))


class LoopMetrics(Collector):
    """A service's instruments for the request path, exposed through its registry.

    Cheap on purpose: a child is a slot incremented in place (prometheus_client's own
    instruments take a lock and check their kind on every ``inc``, about 1 µs each; a request
    of the router writes a dozen). They are written from the event loop's thread only and read
    by the scrape's thread, which copies each child as it reads it: a scrape may see one
    request's counters half applied, never a corrupt value.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._families: list[Family[LoopCounter] | Family[LoopHistogram]] = []
        registry.register(self)

    def counter(
        self, name: str, documentation: str, labels: Sequence[str] = ()
    ) -> Family[LoopCounter]:
        """``name`` without ``_total`` (the exposition adds it)."""
        family = Family(name, documentation, labels, "counter", LoopCounter)
        self._families.append(family)
        return family

    def gauge(
        self, name: str, documentation: str, labels: Sequence[str] = ()
    ) -> Family[LoopCounter]:
        family = Family(name, documentation, labels, "gauge", LoopCounter)
        self._families.append(family)
        return family

    def histogram(
        self,
        name: str,
        documentation: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> Family[LoopHistogram]:
        bounds = tuple(float(b) for b in buckets)
        family = Family(name, documentation, labels, "histogram", lambda: LoopHistogram(bounds))
        self._families.append(family)
        return family

    def collect(self) -> Iterator[Metric]:
        for family in list(self._families):
            yield family.export()


class TokenizerCacheCollector(Collector):
    """Each loaded vocabulary's encoding cache (``Tokenizer.cache_stats``), read at each
    scrape: ``cachemesh_tokenizer_cache_{hits,misses}_total{vocabulary}``,
    ``cachemesh_tokenizer_cache_held_tokens`` and ``..._budget_tokens``. A hit share falling
    while held stays at the budget: more sessions in turn than the budget holds (raise
    CACHEMESH_TOKENIZER_CACHE_TOKENS). Nothing before the tokenizers are loaded."""

    def __init__(self, loaded: Callable[[], Iterable[Tokenizer]]) -> None:
        self._loaded = loaded

    def collect(self) -> Iterator[Metric]:
        label = ["vocabulary"]
        hits = CounterMetricFamily(
            "cachemesh_tokenizer_cache_hits", "Texts whose encoding was cached", labels=label
        )
        misses = CounterMetricFamily(
            "cachemesh_tokenizer_cache_misses", "Texts encoded (not cached)", labels=label
        )
        held = GaugeMetricFamily(
            "cachemesh_tokenizer_cache_held_tokens",
            "What the cached encodings hold, in tokens' worth (ids, texts, overhead)",
            labels=label,
        )
        budget = GaugeMetricFamily(
            "cachemesh_tokenizer_cache_budget_tokens",
            "The most the cached encodings may hold (CACHEMESH_TOKENIZER_CACHE_TOKENS)",
            labels=label,
        )
        for tokenizer in self._loaded():
            stats = tokenizer.cache_stats()
            hits.add_metric([tokenizer.name], stats.hits)
            misses.add_metric([tokenizer.name], stats.misses)
            held.add_metric([tokenizer.name], stats.held_tokens)
            budget.add_metric([tokenizer.name], stats.budget_tokens)
        yield from (hits, misses, held, budget)
