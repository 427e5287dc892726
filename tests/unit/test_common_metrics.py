"""services.common.metrics: settings, the /metrics endpoint, bounded tenant labels, children."""

from __future__ import annotations

import asyncio
import socket
import threading
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest

from services.common.env import ConfigError, Env
from services.common.metrics import (
    NONE,
    OTHER,
    LoopMetrics,
    MetricsEndpoint,
    MetricsSettings,
    TenantLabels,
    new_registry,
)


def test_settings_name_their_variable() -> None:
    settings = MetricsSettings.from_env(Env({}), "ROUTER", "127.0.0.1:9101")
    assert (settings.listen, settings.listen_var, settings.max_tenants) == (
        "127.0.0.1:9101",
        "ROUTER_METRICS_LISTEN",
        100,
    )
    zero = MetricsSettings.from_env(Env({"CACHEMESH_METRICS_MAX_TENANTS": "0"}), "X", "h:1")
    assert zero.max_tenants == 0  # 0 is a value: every tenant is "other"
    with pytest.raises(ConfigError, match="ROUTER_METRICS_LISTEN"):
        MetricsSettings.from_env(Env({"ROUTER_METRICS_LISTEN": "9101"}), "ROUTER", "h:1")
    with pytest.raises(ConfigError, match="CACHEMESH_METRICS_MAX_TENANTS"):
        MetricsSettings.from_env(Env({"CACHEMESH_METRICS_MAX_TENANTS": "many"}), "X", "h:1")


def test_tenants_past_the_cap_share_other_and_are_not_remembered() -> None:
    labels = TenantLabels(2)
    assert [labels(t) for t in ("a", "b", "c", "a", "d", "b")] == ["a", "b", OTHER, "a", OTHER, "b"]
    assert labels("") == NONE
    assert len(labels._kept) == 2
    assert TenantLabels(0)("a") == OTHER


def test_loop_metrics_expose_counters_gauges_and_histograms() -> None:
    registry = new_registry()
    metrics = LoopMetrics(registry)
    counter = metrics.counter("things", "things", ("kind",))
    assert counter("a") is counter("a")  # made once
    counter("a").inc(2)
    counter("b").inc()
    gauge = metrics.gauge("level", "level")()
    gauge.inc(5)
    gauge.dec(2)
    latency = metrics.histogram("wait_seconds", "waits", ("op",), buckets=(0.1, 1.0))
    for seconds in (0.05, 0.1, 0.5, 3.0):
        latency("x").observe(seconds)
    sample = registry.get_sample_value
    assert sample("things_total", {"kind": "a"}) == 2.0
    assert sample("things_total", {"kind": "b"}) == 1.0
    assert sample("level", {}) == 3.0
    buckets = [
        sample("wait_seconds_bucket", {"op": "x", "le": le}) for le in ("0.1", "1.0", "+Inf")
    ]
    assert buckets == [2.0, 3.0, 4.0]  # le: at most the bound, cumulative
    assert sample("wait_seconds_count", {"op": "x"}) == 4.0
    assert sample("wait_seconds_sum", {"op": "x"}) == 3.65
    with pytest.raises(ValueError, match="things takes labels"):
        counter("a", "b")


def test_the_exposition_declares_a_family_before_its_first_sample() -> None:
    registry = CollectorRegistry()
    LoopMetrics(registry).counter("cachemesh_later", "not yet", ("tenant",))
    text = generate_latest(registry).decode()
    assert (
        "# TYPE cachemesh_later_total counter" in text or "# TYPE cachemesh_later counter" in text
    )


async def test_the_endpoint_serves_the_exposition_and_process_metrics() -> None:
    registry = new_registry()
    Counter("cachemesh_probe", "a probe", registry=registry).inc(3)
    endpoint = MetricsEndpoint(MetricsSettings("127.0.0.1:0", "X_METRICS_LISTEN", 1), registry)
    threads = threading.active_count()
    await endpoint.start()
    assert endpoint.port > 0
    assert threading.active_count() == threads  # served on the loop: no thread of its own
    try:
        url = f"http://127.0.0.1:{endpoint.port}/metrics"
        reply = await asyncio.to_thread(urllib.request.urlopen, url, timeout=5)
        with reply:
            text = reply.read().decode()
            kind = reply.headers["content-type"]
    finally:
        await endpoint.stop()
    assert "cachemesh_probe_total 3.0" in text
    assert "process_cpu_seconds_total" in text
    assert kind.startswith("text/plain; version=")


async def test_a_held_port_stops_the_start_naming_the_variable() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        settings = MetricsSettings(f"127.0.0.1:{port}", "MODEL_METRICS_LISTEN", 1)
        with pytest.raises(ConfigError, match=f"MODEL_METRICS_LISTEN=127.0.0.1:{port}"):
            await MetricsEndpoint(settings, new_registry()).start()


async def test_readyz_answers_what_ready_says_and_is_absent_without_it() -> None:
    import urllib.error

    answer = {"ready": False}

    async def ready() -> bool:
        return answer["ready"]

    settings = MetricsSettings("127.0.0.1:0", "X_METRICS_LISTEN", 1)

    async def get(endpoint: MetricsEndpoint) -> int:
        url = f"http://127.0.0.1:{endpoint.port}/readyz"
        try:
            with await asyncio.to_thread(urllib.request.urlopen, url, timeout=5) as reply:
                return int(reply.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    endpoint = MetricsEndpoint(settings, new_registry(), ready=ready)
    await endpoint.start()
    try:
        assert await get(endpoint) == 503
        answer["ready"] = True
        assert await get(endpoint) == 200
    finally:
        await endpoint.stop()
    bare = MetricsEndpoint(settings, new_registry())
    await bare.start()
    try:
        assert await get(bare) == 404
    finally:
        await bare.stop()
