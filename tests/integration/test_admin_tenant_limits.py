"""Per-tenant limits on real processes: two routers of their own beside the session's stack (its
caches and replicas), on one key file and so one per-tenant limits file beside it, every
tenant held to the routers' ROUTER_LIMIT_REQUESTS_PER_MIN=100 unless it has its own.

Through router one's Admin API (the CLI) tenant "low" gets 1 request a minute, then a daily
budget of $0; router two reads the file at its next poll (no restart): low is refused
RESOURCE_EXHAUSTED there, naming its own limit, while tenant "plain" (the routers' limits) is
served. Taken back to the routers' settings, low is served again. How long a change took to
reach router two is printed (pytest -s); the bound is the store's (CACHEMESH_API_KEYS_POLL_S,
tested with an injected clock in tests/unit/test_tenant_limits.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import grpc
import pytest

from cachemesh import Client, RateLimitError, build_request
from cachemesh.admin import AdminClient
from cachemesh.v1 import gateway_pb2 as pb
from services.common.auth import hash_key, new_api_key
from services.tools.stack.health import SERVING, probe
from tests.integration.extra_processes import Started, loopback, processes, service_env
from tests.integration.harness import ROOT, RunningStack

pytestmark = pytest.mark.integration


def _ask(address: str, key: str) -> pb.CompleteResponse:
    with Client(address, api_key=key, timeout_s=60, max_attempts=1) as client:
        question = f"What is a token bucket? ({uuid.uuid4().hex[:8]})"
        return client.complete(build_request(question, model="sim-small", max_tokens=8))


def _refused(address: str, key: str) -> RateLimitError:
    with pytest.raises(RateLimitError) as caught:
        _ask(address, key)
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    return caught.value


def _until(condition: Callable[[], bool], what: str, timeout_s: float = 15.0) -> float:
    began = time.monotonic()
    while not condition():
        assert time.monotonic() - began < timeout_s, f"{what}: not within {timeout_s} s"
        time.sleep(0.05)
    took = time.monotonic() - began
    print(f"{what}: {took:.2f} s")
    return took


def _served(address: str, key: str) -> bool:
    try:
        _ask(address, key)
    except RateLimitError:
        return False
    return True


def test_a_tenants_own_limits_set_through_one_router_hold_on_the_other(
    stack: RunningStack, tmp_path: Path
) -> None:
    suffix = uuid.uuid4().hex[:6]
    low, plain = f"low-{suffix}", f"plain-{suffix}"
    keys = {low: new_api_key(), plain: new_api_key()}
    key_file = tmp_path / "api-keys"
    key_file.write_text("".join(f"{t}:{hash_key(k)}\n" for t, k in keys.items()))
    token_file = stack.stack.run_dir / "admin-token"
    with ExitStack() as running:
        one, two = _routers(stack, running, key_file, tmp_path)
        admin_two = running.enter_context(
            AdminClient(two, admin_token=token_file.read_text().strip())
        )
        limits = admin_two.limits(low)
        assert limits.requests_per_min.value == 100 and not limits.requests_per_min.own

        def cli(*args: str, exits: int = 0) -> str:
            env = {**os.environ, "CACHEMESH_ADMIN_TOKEN_FILE": str(token_file)}
            done = subprocess.run(
                [sys.executable, "-m", "cachemesh.cli", "--target", one, "admin", *args],
                cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            assert done.returncode == exits, done.stderr
            return done.stdout + done.stderr

        # a typo (tenant names are case-sensitive) changes nothing
        typo = cli("limits", "set", low.upper(), "--requests-per-min", "1", exits=1)
        assert "FAILED_PRECONDITION" in typo and f"did you mean '{low}'?" in typo
        refused = cli("limits", "set", low, "--requests-per-min", "0", exits=1)
        assert "INVALID_ARGUMENT" in refused and "whole requests a minute, from 1" in refused

        shown = cli("limits", "set", low, "--requests-per-min", "1")
        assert "1 requests/min" in shown and "its own" in shown
        _until(lambda: admin_two.limits(low).requests_per_min.own, "a limit reached router two")
        _ask(two, keys[low])  # its one request of the minute
        error = _refused(two, keys[low])
        assert "this tenant may send 1 requests a minute" in error.message
        for _ in range(3):  # the routers' 100 a minute
            assert _ask(two, keys[plain]).usage.output_tokens > 0

        # a daily budget of $0: refused the next request, on either router
        listed = json.loads(cli("--json", "limits", "set", low, "--day-budget", "0"))
        assert listed["dayBudgetNanos"] == {"value": "0", "own": True}
        _until(lambda: admin_two.limits(low).day_budget_nanos.own, "a budget reached router two")
        for address in (one, two):
            budget = _refused(address, keys[low])
            assert "daily budget of $0.00 is spent" in budget.message
        assert _served(one, keys[plain])
        table = cli("limits", "list")
        assert low in table and plain not in table and "(every other)" in table

        # back to the routers' settings: served again on router two, without a restart
        cli("limits", "set", low, "--requests-per-min", "default", "--day-budget", "default")
        _until(lambda: _served(two, keys[low]), "the routers' limits back on router two")
        assert admin_two.list_limits().tenants == []


def _routers(
    stack: RunningStack, running: ExitStack, key_file: Path, work: Path
) -> tuple[str, str]:
    addresses: list[str] = []
    specs: list[Started] = []
    for name in ("one", "two"):
        address = loopback()
        env = service_env(
            stack,
            "router",
            {
                "ROUTER_LISTEN": address,
                "CACHEMESH_API_KEYS_FILE": str(key_file),
                "ROUTER_LIMIT_REQUESTS_PER_MIN": "100",
            },
        )
        env.pop("ROUTER_LIMITS_REDIS_URL", None)  # each counts in its own process
        env.pop("ROUTER_TENANT_LIMITS_FILE", None)  # beside the key file
        ready = lambda address=address: probe(address) == SERVING  # noqa: E731
        specs.append(("services.router", env, work / f"{name}.log", ready))
        addresses.append(address)
    running.enter_context(processes(specs))  # side by side: they load their models at once
    return addresses[0], addresses[1]
