"""Each service names, as it starts, a setting of cachemesh's prefixes that nothing reads.

``ROUTER_BUDGET_USD_PER_DAYS=0`` (for ``ROUTER_BUDGET_USD_PER_DAY``) was ignored without a word
by every process, under compose or run directly as under ``make up``: the stack ran without
the budget meant (5 of 5 requests answered 200, the right name refused 5 of 5 with 429). Now
each service logs a WARNING naming it and the setting closest to it."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from cachemesh.envfile import read_env_file
from services.common.unread import warn_unread_settings
from services.prefix_cache.app import serve
from services.tools.stack.ports import free_port

ROOT = Path(__file__).resolve().parents[2]


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name == "cachemesh.settings"
    ]


def test_a_misspelled_setting_is_named_with_the_one_meant(
    caplog: pytest.LogCaptureFixture,
) -> None:
    environ = {"ROUTER_BUDGET_USD_PER_DAYS": "0", "HOME": "/root", "ROUTER_LISTEN": "x"}
    assert warn_unread_settings(environ, "router") == ["ROUTER_BUDGET_USD_PER_DAYS"]
    (line,) = _warnings(caplog)
    assert line.startswith("router: ROUTER_BUDGET_USD_PER_DAYS is not a setting")
    assert line.endswith("did you mean ROUTER_BUDGET_USD_PER_DAY?")


def kubernetes_service_links() -> dict[str, str]:
    """What a pod gets for Services named router, model, prefix-cache, semantic-cache and
    http-front in its namespace (35 variables)."""
    env: dict[str, str] = {}
    for name, port in [
        ("ROUTER", 50051),
        ("MODEL", 50061),
        ("PREFIX_CACHE", 50071),
        ("SEMANTIC_CACHE", 50081),
        ("HTTP_FRONT", 8080),
    ]:
        link = f"{name}_PORT_{port}_TCP"
        env |= {
            f"{name}_SERVICE_HOST": "10.0.0.1",
            f"{name}_SERVICE_PORT": str(port),
            f"{name}_PORT": f"tcp://10.0.0.1:{port}",
            link: f"tcp://10.0.0.1:{port}",
            f"{link}_PROTO": "tcp",
            f"{link}_PORT": str(port),
            f"{link}_ADDR": "10.0.0.1",
        }
    return env


def test_kubernetes_service_links_are_not_taken_for_misspellings(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Kubernetes gives every pod ROUTER_SERVICE_HOST, MODEL_PORT_50061_TCP_ADDR, ... for the
    Services named like ours: 35 false warnings ("did you mean SEMANTIC_CACHE_ORT_THREADS?").
    A name of that form with a value of that form is none; one with another value still is."""
    environ = kubernetes_service_links() | {
        "ROUTER_SERVICE_PORT_GRPC": "50051",  # a named port's
        "ROUTER_METRICS_PORT": "9100",  # not a Kubernetes value: a misspelling
        "ROUTER_BUDGET_USD_PER_DAYS": "0",
    }
    named = warn_unread_settings(environ, "router")
    assert named == ["ROUTER_BUDGET_USD_PER_DAYS", "ROUTER_METRICS_PORT"]
    assert len(_warnings(caplog)) == 2


def test_the_shipped_dotenv_names_none() -> None:
    assert warn_unread_settings(read_env_file(ROOT / ".env"), "router") == []


async def test_a_service_warns_of_one_as_it_starts(caplog: pytest.LogCaptureFixture) -> None:
    environ = {
        "CACHEMESH_INTERNAL_TOKEN": "t" * 32,
        "PREFIX_CACHE_LISTEN": f"127.0.0.1:{free_port()}",
        "PREFIX_CACHE_METRICS_LISTEN": f"127.0.0.1:{free_port()}",
        "OTEL_SDK_DISABLED": "true",
        "PREFIX_CACHE_LOOKBACK_BLOCK": "5",  # PREFIX_CACHE_LOOKBACK_BLOCKS misspelled
    }
    stop = asyncio.Event()
    serving = asyncio.ensure_future(serve(environ, stop))
    try:
        for _ in range(300):
            if _warnings(caplog) or serving.done():
                break
            await asyncio.sleep(0.02)
        assert not serving.done(), serving.result()
    finally:
        stop.set()
        await asyncio.wait_for(serving, 30)
    (line,) = _warnings(caplog)
    assert "PREFIX_CACHE_LOOKBACK_BLOCK is not a setting" in line
    assert "did you mean PREFIX_CACHE_LOOKBACK_BLOCKS?" in line
