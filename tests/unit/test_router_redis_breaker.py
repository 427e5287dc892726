"""The router's Redis clients (the limits', the answer ledger's) leave a hung Redis alone.

A Redis that hangs (SIGSTOP: a fork for a big RDB/AOF rewrite on a loaded host, a VM pause)
held every request for the ledger's claim, the limits' admit and the answer's record, each
its own 0.5 s timeout, for as long as it hung: nothing remembered the earlier failures (1.5 s
more per request, 10 requests in turn). Now, as prefix-cache's breaker does, after 3 calls in
a row failed or timed out a client does not call its Redis for ROUTER_REDIS_BREAKER_S (the
request goes on as when the call fails: admitted without its limits, served without its
protection across routers), then tries again. A real redis-server, SIGSTOPped; the breakers'
time is injected, and the test counts the calls made to Redis, not how long they took.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from cachemesh import build_request
from services.common.clock import ManualClock
from services.common.env import ConfigError, Env
from services.common.metrics import TenantLabels, new_registry
from services.router import servicer as servicer_module
from services.router.breaker import Breaker, redis_breaker
from services.router.idempotency import IdempotencyTable
from services.router.limit_policy import LimitPolicy, Refusal, UniformPolicies
from services.router.limit_settings import LimitSettings
from services.router.limit_store import Admission
from services.router.limits import Limiter
from services.router.metrics import RouterMetrics
from services.router.redis_limits import RedisLimitStore
from tests.redis_server import client_of, redis_server, sync_client_of
from tests.unit.gateway_support import gateway_servicer, no_prompt
from tests.unit.test_router_answer_ledger import (
    CLIENT_MARK,
    KEY,
    CountingLedger,
    FakeContext,
    FakePipeline,
)

HUNG_TIMEOUT_S = 0.2  # a call to the stopped Redis: it never answers, so any timeout will do
PATIENT_TIMEOUT_S = 10.0  # a call to the running Redis (a loaded test machine may be slow)
BREAKER_S = 5.0


class CountingStore(RedisLimitStore):
    """The limits' real Redis store, counting the admits sent to it."""

    def __init__(self, url: str) -> None:
        super().__init__(client_of(url))
        self.admits = 0

    async def admit(self, asked: Admission) -> Refusal | None:
        self.admits += 1
        return await super().admit(asked)


class Seconds:
    """The breakers' clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    with redis_server(tmp_path) as url:
        yield url


class Rig:
    def __init__(self, url: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch = monkeypatch
        self.registry = new_registry()
        metrics = RouterMetrics(self.registry, TenantLabels(1))
        self.seconds = Seconds()
        server = url.rsplit("/", 1)[0]
        self.ledger = CountingLedger(f"{server}/2")  # the stack's databases
        self.store = CountingStore(f"{server}/1")
        self.limiter = Limiter(
            self.store,
            UniformPolicies(LimitPolicy(day_budget_nanos=10**12)),
            ManualClock(),
            no_prompt,
            counted=metrics.degraded,
            breaker=redis_breaker(
                "limits", BREAKER_S, metrics.redis_breaker_opened, clock=self.seconds
            ),
        )
        self.servicer = gateway_servicer(
            FakePipeline(),
            {KEY: "tenant-a"},
            deployed=["sim-small"],
            answers=IdempotencyTable(ManualClock(), 60, 100),
            limiter=self.limiter,
            metrics=metrics,
            ledger=self.ledger,
            ledger_failed=metrics.ledger_failed,
            ledger_breaker=redis_breaker(
                "answer_ledger", BREAKER_S, metrics.redis_breaker_opened, clock=self.seconds
            ),
        )
        self.sent = 0

    def timeouts(self, seconds: float) -> None:
        """How long the ledger's and the limits' calls wait for Redis."""
        self.monkeypatch.setattr(servicer_module, "LEDGER_TIMEOUT_S", seconds)
        self.limiter._timeout_s = seconds

    async def requests(self, n: int) -> tuple[int, int]:
        """Sends ``n`` requests in turn (each with the caller's own id, marked: the Python
        client's and the HTTP front's); how many ledger calls and admits they made."""
        ledger, admits = len(self.ledger.calls), self.store.admits
        for _ in range(n):
            self.sent += 1
            request = build_request(f"q{self.sent}", model="sim-small", request_id=f"id{self.sent}")
            answer = await self.servicer.Complete(request, FakeContext(CLIENT_MARK))  # type: ignore[arg-type]
            assert answer.content  # served, whatever Redis does
        return len(self.ledger.calls) - ledger, self.store.admits - admits


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, labels)
    assert found is not None, (name, labels)
    return found


def _breaker_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The breakers' lines at INFO and above: a WARNING as a Redis is left alone, an INFO as
    it answers again (a re-open is DEBUG)."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.INFO
        and ("ROUTER_REDIS_BREAKER_S" in r.getMessage() or "answers again" in r.getMessage())
    ]


def test_a_hung_redis_is_left_alone_after_three_calls_in_a_row_fail(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cachemesh")
    with sync_client_of(redis_url) as admin:
        pid = int(admin.info("server")["process_id"])

    async def run() -> None:
        rig = Rig(redis_url, monkeypatch)
        rig.timeouts(PATIENT_TIMEOUT_S)
        assert await rig.requests(1) == (2, 1)  # a claim and a record; an admit
        os.kill(pid, signal.SIGSTOP)
        try:
            rig.timeouts(HUNG_TIMEOUT_S)
            # ledger: the 1st request's claim and record, the 2nd's claim time out, then none;
            # limits: the first 3 admits time out, then none (each request admitted, served)
            assert await rig.requests(6) == (3, 3)
            assert rig.ledger.calls[-3:] == ["claim", "record", "claim"]
            # the calls not made count as the failures they stand for (the alerts still fire)
            ledger_failures = "cachemesh_router_answer_ledger_failures_total"
            for operation in ("claim", "record"):
                assert _value(rig.registry, ledger_failures, operation=operation) == 6
            degraded = "cachemesh_router_degraded_total"
            assert (
                _value(rig.registry, degraded, dependency="limits", reason="DEADLINE_EXCEEDED") == 6
            )
            assert len(_breaker_lines(caplog)) == 2  # one line each as it is left alone
            rig.seconds.now += BREAKER_S - 0.001
            assert await rig.requests(1) == (0, 0)
            # its time over, Redis is tried again: still hung, left alone again at once
            rig.seconds.now += 0.001
            assert await rig.requests(3) == (1, 1)
            assert len(_breaker_lines(caplog)) == 2  # no new line while it stays hung
        finally:
            os.kill(pid, signal.SIGCONT)
        rig.timeouts(PATIENT_TIMEOUT_S)
        assert await rig.requests(1) == (0, 0)  # still within its time
        rig.seconds.now += BREAKER_S
        assert await rig.requests(2) == (4, 2)  # it answers: called as usual again
        lines = _breaker_lines(caplog)
        assert len(lines) == 4 and all("answers again" in line for line in lines[2:]), lines
        opens = "cachemesh_router_redis_breaker_opens_total"
        for client in ("limits", "answer_ledger"):
            assert _value(rig.registry, opens, client=client) == 2  # left alone twice
        await rig.ledger.close()
        await rig.store.close()

    asyncio.run(run())


def test_a_breaker_of_zero_seconds_never_leaves_redis_alone() -> None:
    seconds = Seconds()
    opened: list[str] = []
    breaker = redis_breaker("limits", 0, opened.append, clock=seconds)
    for _ in range(10):
        breaker.failed()
        assert not breaker.open()
    assert opened == []


def test_an_answer_ends_the_run_of_failures() -> None:
    seconds = Seconds()
    breaker = Breaker(BREAKER_S, seconds)
    for _ in range(2):
        breaker.failed()
    breaker.answered()
    for _ in range(2):
        breaker.failed()
    assert not breaker.open()
    breaker.failed()
    assert breaker.open()


def test_the_redis_breaker_is_read_at_start_and_zero_turns_it_off() -> None:
    assert LimitSettings.from_env(Env({})).redis_breaker_s == 5.0
    assert LimitSettings.from_env(Env({"ROUTER_REDIS_BREAKER_S": "0"})).redis_breaker_s == 0
    for bad in ("-1", "soon"):
        with pytest.raises(ConfigError, match="ROUTER_REDIS_BREAKER_S"):
            LimitSettings.from_env(Env({"ROUTER_REDIS_BREAKER_S": bad}))


def test_after_the_wait_one_call_tries_the_dependency_the_others_still_skip_it() -> None:
    """Half-open: once the wait is over, one call tries the dependency; the calls meanwhile are
    still skipped until that one answers or fails. Before, every request in the trial's
    timeout tried the hung Redis (50 concurrent admits after the wait, each 0.53 s and a
    WARNING line), though the README says one request every ROUTER_REDIS_BREAKER_S."""
    seconds = Seconds()
    breaker = Breaker(BREAKER_S, seconds)
    for _ in range(3):
        breaker.failed()
    assert breaker.open()
    seconds.now += BREAKER_S
    assert [breaker.open() for _ in range(50)].count(False) == 1  # the one trial
    breaker.failed()  # the trial failed: left alone again at once
    assert breaker.open()
    seconds.now += BREAKER_S
    assert [breaker.open() for _ in range(50)].count(False) == 1
    breaker.answered()  # the trial answered: called as usual
    assert [breaker.open() for _ in range(50)].count(False) == 50


def test_a_trial_that_never_reports_frees_the_next_after_the_wait() -> None:
    """A trial whose caller left (cancelled: neither answered nor failed) does not keep the
    dependency alone for good: after another wait, one more call tries it."""
    seconds = Seconds()
    breaker = Breaker(BREAKER_S, seconds)
    for _ in range(3):
        breaker.failed()
    seconds.now += BREAKER_S
    assert not breaker.open()  # the trial, never reported
    assert breaker.open()
    seconds.now += BREAKER_S
    assert not breaker.open()
