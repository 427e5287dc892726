"""Per-tenant limits (services.router.tenant_limits): the file's lines and their checks, which
limit a tenant is held to (its own, "unlimited", or the router's), the file shared by two
routers' stores (one changes it, the other sees it at its next poll, on an injected clock),
and the limiter over both stores (memory, Redis) holding each tenant to its own limits,
counted as ever: a budget lowered mid-day applies to what was spent already."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import pytest

from services.common import polled_file
from services.common.clock import ManualClock
from services.common.env import ConfigError, Env
from services.router import tenant_limits
from services.router.key_settings import KeyStoreSettings
from services.router.limit_denials import Denial
from services.router.limit_policy import DAY_BUDGET, NANOS_PER_DOLLAR, REQUESTS, LimitPolicy
from services.router.limit_settings import LimitSettings
from services.router.limit_store import LimitStore
from services.router.limit_tickets import Ticket
from services.router.limit_wiring import tenant_policies
from services.router.limits import Limiter
from services.router.memory_limits import MemoryLimitStore
from services.router.tenant_limits import (
    LIMITS,
    MAX_BUDGET_NANOS,
    LimitsFileError,
    LimitValueError,
    PerTenantPolicies,
    TenantLimitStore,
    TenantOverride,
    check_value,
    parse,
    render,
)
from tests.unit.gateway_support import PATIENT_STORE_S
from tests.unit.test_router_limits import START_MS, _answer, _count, _request
from tests.unit.test_router_limits import store as store

DEFAULTS = LimitPolicy(
    requests_per_min=600, tokens_per_min=None, day_budget_nanos=50 * NANOS_PER_DOLLAR
)


class Ticks:
    """A monotonic clock moved by hand (the stores' polls)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_files_limits_are_the_policys() -> None:
    assert tuple(f.name for f in fields(LimitPolicy)) == LIMITS


def test_a_line_overrides_the_limits_it_names_and_keeps_the_routers_for_the_rest() -> None:
    text = (
        "# a comment\n\n"
        '{"tenant":"free","requests_per_min":10,"day_budget_nanos":0}\n'
        '{"tenant":"gold","requests_per_min":"unlimited","month_budget_nanos":500000000000,'
        '"updated_at":1700000000.5}\n'
    )
    free, gold = parse(text, "f")
    assert free.applied_to(DEFAULTS) == LimitPolicy(
        requests_per_min=10, tokens_per_min=None, day_budget_nanos=0
    )
    assert gold.applied_to(DEFAULTS) == LimitPolicy(
        requests_per_min=None,  # unlimited, whatever the router's 600
        day_budget_nanos=50 * NANOS_PER_DOLLAR,  # the router's
        month_budget_nanos=500 * NANOS_PER_DOLLAR,
    )
    assert gold.updated_at == 1700000000.5
    assert parse(render([gold, free]), "again") == [free, gold]  # by tenant


@pytest.mark.parametrize(
    ("line", "said"),
    [
        ('{"tenant":"a","requests_per_min":0}', "requests_per_min must be whole requests a minute"),
        ('{"tenant":"a","tokens_per_min":-5}', "tokens_per_min must be whole tokens a minute"),
        ('{"tenant":"a","tokens_per_min":1.5}', "from 1 to 1,000,000,000,000"),
        ('{"tenant":"a","requests_per_min":true}', "got True"),
        ('{"tenant":"a","day_budget_nanos":-1}', "nano-dollars a UTC day"),
        ('{"tenant":"a","month_budget_nanos":9000000000000000001}', "($9,000,000"),
        ('{"tenant":"a","day_budget_nanos":null}', "or 'unlimited', got None"),
        ('{"tenant":"a","day_budget_nanos":"none"}', "got 'none'"),
        ('{"tenant":"a","requests":5}', "some of the fields"),
        ('{"requests_per_min":5}', "with a tenant"),
        ('{"tenant":"a b","requests_per_min":5}', "tenant must be 1 to 64"),
        ('{"tenant":"a","updated_at":"now"}', "updated_at must be Unix seconds"),
        ("tenant: a", "not JSON"),
        ('{"tenant":"a","day_budget_nanos":' + "9" * 5000 + "}", "not a limit (Exceeds"),
    ],
)
def test_a_malformed_line_is_named_with_its_unit(line: str, said: str) -> None:
    with pytest.raises(LimitsFileError) as caught:
        parse(f"# header\n{line}\n", "limits")
    assert str(caught.value).startswith("limits:2: ") and said in str(caught.value)


def test_a_tenant_on_two_lines_is_refused() -> None:
    with pytest.raises(LimitsFileError, match="tenant a has two lines"):
        parse('{"tenant":"a"}\n{"tenant":"a","requests_per_min":1}\n', "f")


def test_the_checks_of_one_value() -> None:
    assert check_value("requests_per_min", 1) == 1
    assert check_value("day_budget_nanos", 0) == 0  # refuses every request, as the setting's 0
    assert check_value("month_budget_nanos", MAX_BUDGET_NANOS) == MAX_BUDGET_NANOS
    assert check_value("tokens_per_min", "unlimited") == "unlimited"
    with pytest.raises(LimitValueError, match="give it a budget of 0 or revoke its keys"):
        check_value("requests_per_min", 0)
    with pytest.raises(LimitValueError, match="1 US dollar = 1,000,000,000"):
        check_value("day_budget_nanos", MAX_BUDGET_NANOS + 1)


def test_a_change_back_to_default_removes_the_override() -> None:
    own = TenantOverride("a").changed({"requests_per_min": 5, "day_budget_nanos": 7}, 1.0)
    assert own == TenantOverride("a", 5, None, 7, None, 1.0)
    cleared = own.changed({"requests_per_min": "default", "day_budget_nanos": "default"}, 2.0)
    assert cleared.empty and cleared.applied_to(DEFAULTS) == DEFAULTS
    with pytest.raises(LimitValueError, match="no such limit: budget"):
        own.changed({"budget": 5}, 3.0)


def _inline(job: Callable[[], None]) -> None:
    """A re-read run as soon as it is started: these tests are about what the file says (the
    worker thread a store re-reads in has a test of its own, below)."""
    job()


def _stores(path: Path, ticks: Ticks, poll_s: float = 0.25) -> tuple[TenantLimitStore, ...]:
    return tuple(
        TenantLimitStore(path, ticks, lambda: 1_700_000_000.0, poll_s, _inline) for _ in "ab"
    )


def test_a_change_made_by_one_router_reaches_the_other_at_its_next_poll(tmp_path: Path) -> None:
    path = tmp_path / "tenant-limits"
    ticks = Ticks()
    one, two = _stores(path, ticks)  # no file yet: no override
    assert one.overrides() == [] and two.override("acme") is None
    own = one.change("acme", {"requests_per_min": 10, "tokens_per_min": "unlimited"})
    assert own == TenantOverride("acme", 10, "unlimited", updated_at=1_700_000_000.0)
    assert one.override("acme") == own  # at once on the router that made it
    assert two.override("acme") is None  # the other reads it at its next poll
    ticks.now += 0.25
    assert two.override("acme") == own
    assert json.loads(path.read_text().splitlines()[1])["tokens_per_min"] == "unlimited"
    assert os.stat(path).st_mode & 0o777 == 0o600
    two.change("beta", {"day_budget_nanos": 0})  # under the lock: the other's line is kept
    assert [o.tenant for o in two.overrides()] == ["acme", "beta"]
    one.change("acme", {"requests_per_min": "default", "tokens_per_min": "default"})
    assert [o.tenant for o in one.overrides()] == ["beta"]  # the line removed
    ticks.now += 0.25
    assert two.override("acme") is None


def test_a_value_refused_leaves_the_file_untouched(tmp_path: Path) -> None:
    (one, _) = _stores(tmp_path / "limits", Ticks())
    with pytest.raises(LimitValueError, match="requests_per_min"):
        one.change("acme", {"requests_per_min": 0})
    with pytest.raises(LimitValueError, match="tenant must be"):
        one.change("no such/tenant", {"requests_per_min": 1})
    assert not (tmp_path / "limits").exists()


def test_a_file_broken_by_hand_keeps_the_limits_read_last(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "limits"
    ticks = Ticks()
    (one, _) = _stores(path, ticks)
    one.change("acme", {"requests_per_min": 10})
    path.write_text('{"tenant":"acme","requests_per_min":0}\n')
    ticks.now += 1
    with caplog.at_level(logging.ERROR, "cachemesh.router.limits"):
        assert one.override("acme") == TenantOverride("acme", 10, updated_at=1_700_000_000.0)
    assert f"{path}:1: requests_per_min must be" in caplog.text
    path.write_text('{"tenant":"acme","requests_per_min":20}\n')
    ticks.now += 1
    assert one.override("acme") == TenantOverride("acme", 20)


def test_a_file_removed_holds_no_override(tmp_path: Path) -> None:
    """As a missing file at start: every tenant is held to the router's settings again."""
    path = tmp_path / "limits"
    ticks = Ticks()
    one, two = _stores(path, ticks)
    one.change("acme", {"day_budget_nanos": 0})
    ticks.now += 1
    assert two.override("acme") is not None and two.any_budget()
    path.unlink()
    ticks.now += 1
    assert two.overrides() == [] and not two.any_budget()


def test_a_router_stops_on_a_malformed_file_naming_its_variable(tmp_path: Path) -> None:
    keys = KeyStoreSettings(tmp_path / "api-keys")
    (tmp_path / "tenant-limits").write_text("not json\n")  # beside the key file by default
    with pytest.raises(ConfigError, match=r"tenant-limits:1: not JSON.*ROUTER_TENANT_LIMITS_FILE"):
        tenant_policies(LimitSettings.from_env(Env({})), keys, Ticks(), lambda: 0.0)
    elsewhere = tmp_path / "elsewhere"
    settings = LimitSettings.from_env(Env({"ROUTER_TENANT_LIMITS_FILE": str(elsewhere)}))
    policies = tenant_policies(settings, keys, Ticks(), lambda: 0.0)
    assert policies.store.path == elsewhere and policies.store.overrides() == []


async def _admit(limiter: Limiter, tenant: str) -> Ticket | Denial:
    return await limiter.admit(tenant, _request(10))


async def test_each_tenant_is_held_to_its_own_limits_counted_as_ever(
    tmp_path: Path,
    store: LimitStore,
) -> None:
    """free: 2 requests a minute and $100 a day of its own; gold: no request rate; others:
    the router's 3. A daily budget given to gold below what it spent refuses it at once:
    its spend was counted while it had no limit, as a budget was set (free's)."""
    ticks = Ticks()
    admin, other_router = _stores(tmp_path / "limits", ticks)
    defaults = LimitPolicy(requests_per_min=3)
    clock = ManualClock(START_MS)
    limiter = Limiter(
        store, PerTenantPolicies(defaults, other_router), clock, _count, timeout_s=PATIENT_STORE_S
    )
    admin.change("free", {"requests_per_min": 2, "day_budget_nanos": 100 * NANOS_PER_DOLLAR})
    admin.change("gold", {"requests_per_min": "unlimited"})
    ticks.now += 1
    for tenant, served in (("free", 2), ("gold", 10), ("plain", 3)):
        for _ in range(served):
            assert isinstance(await _admit(limiter, tenant), Ticket), tenant
        if tenant != "gold":
            denial = await _admit(limiter, tenant)
            assert isinstance(denial, Denial) and denial.limit == REQUESTS
            assert f"may send {served} requests a minute" in denial.message
    # gold spends $3 today; its budget (none so far) is then set to $2: refused at once
    gold = await _admit(limiter, "gold")
    assert isinstance(gold, Ticket) and not gold.policy.active and gold.counted
    limiter.settle(gold, _answer(10, 10, cost_nanos=3 * NANOS_PER_DOLLAR))
    await limiter.drain()
    admin.change("gold", {"day_budget_nanos": 2 * NANOS_PER_DOLLAR})
    ticks.now += 1
    refused = await _admit(limiter, "gold")
    assert isinstance(refused, Denial) and refused.limit == DAY_BUDGET
    assert "daily budget of $2.00 is spent" in refused.message
    # raised back above what it spent: served again, the same count
    admin.change("gold", {"day_budget_nanos": 4 * NANOS_PER_DOLLAR})
    ticks.now += 1
    assert isinstance(await _admit(limiter, "gold"), Ticket)


async def test_with_no_budget_anywhere_an_unlimited_tenants_spend_is_not_counted(
    tmp_path: Path,
) -> None:
    """As before per-tenant limits: no limit, nothing sent to the store; a first budget
    counts from when it is set."""
    (one, _) = _stores(tmp_path / "limits", Ticks())
    policies = PerTenantPolicies(LimitPolicy(), one)
    assert not policies.counts_every_spend()
    one.change("free", {"requests_per_min": 5})
    assert not policies.counts_every_spend()
    one.change("free", {"month_budget_nanos": "unlimited"})
    assert not policies.counts_every_spend()
    one.change("free", {"month_budget_nanos": 1})
    assert policies.counts_every_spend()
    assert PerTenantPolicies(LimitPolicy(day_budget_nanos=0), one).counts_every_spend()


class _Threads:
    """Starts each re-read in a thread, as a store does, and keeps it for the test to join."""

    def __init__(self) -> None:
        self.started: list[threading.Thread] = []

    def __call__(self, job: Callable[[], None]) -> None:
        thread = threading.Thread(target=job, daemon=True)
        self.started.append(thread)
        thread.start()

    def join(self) -> None:
        for thread in self.started:
            thread.join(10)
            assert not thread.is_alive()


async def test_an_admit_never_waits_for_a_reread_and_holds_to_the_new_limits_once_swapped_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change of the limits file made every other router re-read and parse it on its event
    loop, in a request's admit (10k tenants: 180-270 ms). The re-read runs in a worker
    thread, here held once the file is read (not yet parsed nor swapped in): the admits
    meanwhile wait for it on the event loop at most ``FRESH_WAIT_S`` (50 ms here), then are
    answered by the limits read last; once it is swapped in, by the new ones."""
    monkeypatch.setattr(polled_file, "FRESH_WAIT_S", 0.05)
    path = tmp_path / "limits"
    ticks = Ticks()
    admin, _ = _stores(path, ticks)
    threads = _Threads()
    reader = TenantLimitStore(path, ticks, lambda: 1_700_000_000.0, 0.25, threads)
    limiter = Limiter(
        MemoryLimitStore(),
        PerTenantPolicies(LimitPolicy(requests_per_min=100), reader),
        ManualClock(START_MS),
        _count,
    )
    here, go = threading.Event(), threading.Event()
    real = tenant_limits.parse

    def held(text: str, source: str) -> list[TenantOverride]:
        here.set()
        go.wait(5)  # on the admit's own thread (the fault), it waits here and fails below
        return real(text, source)

    admin.change("acme", {"requests_per_min": 1})  # another router's change
    monkeypatch.setattr(tenant_limits, "parse", held)
    ticks.now += 1  # past poll_s: this admit notices the change and starts a re-read
    first = await _admit(limiter, "acme")
    assert isinstance(first, Ticket) and first.policy.requests_per_min == 100  # the router's
    assert here.wait(10)  # the re-read has read the file and is held
    for _ in range(3):
        ticks.now += 1  # polls while it runs start no other re-read
        held_to = await _admit(limiter, "acme")
        assert isinstance(held_to, Ticket) and held_to.policy.requests_per_min == 100
    assert len(threads.started) == 1
    go.set()
    threads.join()
    swapped = await _admit(limiter, "acme")  # its bucket capped at the new rate: one left
    assert isinstance(swapped, Ticket) and swapped.policy.requests_per_min == 1
    denial = await _admit(limiter, "acme")
    assert isinstance(denial, Denial) and denial.limit == REQUESTS
    assert "may send 1 requests a minute" in denial.message


async def test_the_first_admit_on_an_idle_router_after_a_change_is_held_to_the_new_limits(
    tmp_path: Path,
) -> None:
    """A router that had no request since another router changed a tenant's limits started
    the re-read at its next admit and answered that admit by the limits read before: a tenant
    whose day budget was raised from $0 to $5 was refused there ("daily budget of $0.00 is
    spent; it renews at 00:00 UTC, in 11.3 h", retry-after 40,732 s, on a real stack), and a
    tenant whose budget was cut to $0 had a request admitted. Now that admit waits for the
    re-read (in its worker thread, as ever) and is held to the new limits."""
    path = tmp_path / "limits"
    ticks = Ticks()
    admin, _ = _stores(path, ticks)
    idle = TenantLimitStore(path, ticks, lambda: 1_700_000_000.0, 0.25)  # real threads
    limiter = Limiter(
        MemoryLimitStore(),
        PerTenantPolicies(DEFAULTS, idle),
        ManualClock(START_MS),
        _count,
    )
    admin.change("acme", {"day_budget_nanos": 0})
    ticks.now += 1
    assert isinstance(await _admit(limiter, "acme"), Denial)  # $0: refused on every router
    for budget, admitted in ((5 * NANOS_PER_DOLLAR, True), (0, False)):
        admin.change("acme", {"day_budget_nanos": budget})  # through another router
        ticks.now += 60  # the idle router: no admit meanwhile
        first = await _admit(limiter, "acme")
        assert isinstance(first, Ticket) is admitted, (budget, first)
