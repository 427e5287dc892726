"""Per-tenant limits: each tenant's own request rate, token rate and budgets, over the router's.

The router's settings (ROUTER_LIMIT_REQUESTS_PER_MIN, ROUTER_LIMIT_TOKENS_PER_MIN,
ROUTER_BUDGET_USD_PER_DAY, ROUTER_BUDGET_USD_PER_MONTH) are every tenant's limits; a tenant
with a line in the limits file (ROUTER_TENANT_LIMITS_FILE, by default ``tenant-limits`` beside
the API key file) is held to its own for each limit that line names: a number, or
``"unlimited"`` (no such limit, whatever the router's setting); a limit the line leaves out is
the router's. Only the limit a tenant is held to changes: the counts (in Redis or in this
process) are the same, so a budget lowered mid-day applies to what the tenant spent already.

The file is the key file's kind (``keyfile.LockedFile``): JSON lines, one tenant each,
``{"tenant", "requests_per_min", "tokens_per_min", "day_budget_nanos", "month_budget_nanos",
"updated_at"}`` (budgets in nano-dollars, exact; ``updated_at`` Unix seconds), ``#`` comments
and blank lines skipped. The Admin API of any router changes it under the file's ``flock`` (read,
change, write a new file, fsync, rename); every router looks at its (inode, size, mtime) at
most every CACHEMESH_API_KEYS_POLL_S on the path of an admit and, when it changed, re-reads
it in a worker thread (the limits read last hold until the new ones are complete; an admit
that finds the file changed, or being re-read, waits for that re-read, at most 1 s, so the
first request after a change on an idle router is held to the new limits; a change is in force
within the poll plus one re-read, at once on the router that made it). A missing file holds
no override (no router has set one yet). A file
that turns malformed is logged at ERROR naming the line, and the limits read last stay in
force until it is fixed; malformed at start-up, it stops the router.

Why a file of its own, not lines in the key file: the key file's readers (every HTTP front,
``make keys``, routers of an older version) refuse a line that is not a key, so an override
written there would stop them at their next start; and a missing limits file is "no override"
where a missing key file is an error.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from services.common.keyfile import LockedFile, Signature, tenant_error
from services.common.polled_file import FileSource, PolledFile, Start, in_a_thread
from services.router.limit_policy import NANOS_PER_DOLLAR, LimitPolicy

log = logging.getLogger("cachemesh.router.limits")

HEADER = (
    "# cachemesh per-tenant limits: each line's limits replace the router's for that tenant "
    "(written by the Admin API)\n"
)
Unlimited = Literal["unlimited"]
UNLIMITED: Unlimited = "unlimited"
DEFAULT: Literal["default"] = "default"  # a change back to the router's own setting
# A tenant's setting of one limit: its own value, "unlimited", or None (the router's setting)
Setting = int | Unlimited | None
# What SetLimits asks of one limit: a value, "unlimited", or "default" (the override removed)
Change = int | Literal["unlimited", "default"]

# The largest budget: $9M, under 2**53 nano-dollars (limit_settings.MAX_BUDGET_USD: the
# limits' Redis compares in Lua doubles, exact only below 2**53).
MAX_BUDGET_NANOS = 9_000_000 * NANOS_PER_DOLLAR
# The largest rate: far above any deployment's, well within the doubles a bucket is kept in.
MAX_PER_MIN = 1_000_000_000_000

RATES = ("requests_per_min", "tokens_per_min")
BUDGETS = ("day_budget_nanos", "month_budget_nanos")
LIMITS = (*RATES, *BUDGETS)
_FIELDS = ("tenant", *LIMITS, "updated_at")
UNITS = {
    "requests_per_min": "requests a minute",
    "tokens_per_min": "tokens a minute",
    "day_budget_nanos": "nano-dollars a UTC day (1 US dollar = 1,000,000,000)",
    "month_budget_nanos": "nano-dollars a UTC month (1 US dollar = 1,000,000,000)",
}


class LimitValueError(ValueError):
    """A limit's value that is refused (the message names the field and its unit)."""


class LimitsFileError(ValueError):
    """The limits file cannot be read, or a line of it is malformed (the message names it)."""


class LimitsFileUnreadable(LimitsFileError):
    """An I/O error reading the file (it may pass), as opposed to a malformed file."""


def check_value(name: str, value: object) -> Setting:
    """``value`` as the setting of the limit ``name`` ("unlimited" or a whole number in its
    range), or ``LimitValueError`` saying the unit and the range. A rate of 0 is refused, as
    the router's own setting refuses it: a budget of 0 refuses every request (as the router's
    does), and revoking its keys refuses a tenant."""
    if value == UNLIMITED:
        return UNLIMITED
    number = value if isinstance(value, int) and not isinstance(value, bool) else None
    if name in RATES:
        if number is not None and 1 <= number <= MAX_PER_MIN:
            return number
        raise LimitValueError(
            f"{name} must be whole {UNITS[name]}, from 1 to {MAX_PER_MIN:,}, or "
            f"'{UNLIMITED}' (0 is refused, as the router's own setting refuses it: to refuse "
            f"every request of a tenant, give it a budget of 0 or revoke its keys), got "
            f"{_shown(value)}"
        )
    if number is not None and 0 <= number <= MAX_BUDGET_NANOS:
        return number
    raise LimitValueError(
        f"{name} must be whole {UNITS[name]}, from 0 (refuses every request of the period) to "
        f"{MAX_BUDGET_NANOS:,} ($9,000,000: the limits' arithmetic is exact up to there), or "
        f"'{UNLIMITED}', got {_shown(value)}"
    )


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


@dataclass(frozen=True)
class TenantOverride:
    """One tenant's own limits: for each, a value, "unlimited", or None (the router's)."""

    tenant: str
    requests_per_min: Setting = None
    tokens_per_min: Setting = None
    day_budget_nanos: Setting = None
    month_budget_nanos: Setting = None
    updated_at: float | None = None

    def setting(self, name: str) -> Setting:
        value: Setting = getattr(self, name)
        return value

    @property
    def empty(self) -> bool:
        """Whether it overrides nothing (the tenant is held to the router's settings)."""
        return all(self.setting(name) is None for name in LIMITS)

    def applied_to(self, defaults: LimitPolicy) -> LimitPolicy:
        """The limits this tenant is held to: its own where it has one, else ``defaults``."""
        chosen: dict[str, int | None] = {}
        for name in LIMITS:
            own = self.setting(name)
            chosen[name] = getattr(defaults, name) if own is None else _limit(own)
        return LimitPolicy(**chosen)

    def changed(self, changes: Mapping[str, Change], at: float) -> TenantOverride:
        """This override with ``changes`` made (each value checked: ``LimitValueError``)."""
        values: dict[str, Setting] = {name: self.setting(name) for name in LIMITS}
        for name, change in changes.items():
            if name not in LIMITS:
                raise LimitValueError(f"no such limit: {name} (one of {', '.join(LIMITS)})")
            values[name] = None if change == DEFAULT else check_value(name, change)
        return TenantOverride(self.tenant, updated_at=at, **values)

    def to_json(self) -> str:
        line: dict[str, object] = {"tenant": self.tenant}
        line.update({name: v for name in LIMITS if (v := self.setting(name)) is not None})
        if self.updated_at is not None:
            line["updated_at"] = self.updated_at
        return json.dumps(line, separators=(",", ":"))


def _limit(setting: int | Unlimited) -> int | None:
    return None if setting == UNLIMITED else int(setting)


def parse(text: str, source: str) -> list[TenantOverride]:
    overrides: list[TenantOverride] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line and not line.startswith("#"):
            overrides.append(_override(line, f"{source}:{number}"))
    tenants = [o.tenant for o in overrides]
    if len(set(tenants)) != len(tenants):
        twice = next(t for t in tenants if tenants.count(t) > 1)
        raise LimitsFileError(f"{source}: tenant {twice} has two lines (one a tenant)")
    return overrides


def _override(line: str, where: str) -> TenantOverride:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise LimitsFileError(f"{where}: not JSON ({exc.msg})") from None
    except ValueError as exc:  # a number of over 4,300 digits (int_max_str_digits)
        raise LimitsFileError(f"{where}: not a limit ({exc})") from None
    if not isinstance(value, dict) or set(value) - set(_FIELDS) or "tenant" not in value:
        raise LimitsFileError(
            f"{where}: a line is a JSON object with a tenant and some of the fields "
            f"{', '.join(_FIELDS[1:])}"
        )
    tenant = value["tenant"]
    if not isinstance(tenant, str) or (error := tenant_error(tenant)):
        raise LimitsFileError(f"{where}: {error if isinstance(tenant, str) else 'tenant: text'}")
    settings: dict[str, Setting] = {}
    try:
        for name in LIMITS:
            if name in value:
                settings[name] = check_value(name, value[name])
    except LimitValueError as exc:
        raise LimitsFileError(f"{where}: {exc}") from None
    at = value.get("updated_at")
    if at is not None and (isinstance(at, bool) or not isinstance(at, int | float)):
        raise LimitsFileError(f"{where}: updated_at must be Unix seconds or null")
    return TenantOverride(tenant, updated_at=None if at is None else float(at), **settings)


def render(overrides: Sequence[TenantOverride]) -> str:
    return HEADER + "".join(o.to_json() + "\n" for o in sorted(overrides, key=lambda o: o.tenant))


class LimitsFile(LockedFile):
    """The limits file: read it (missing: no override), change it under its lock."""

    def read(self) -> tuple[list[TenantOverride], Signature | None]:
        try:
            with open(self.path, "rb") as handle:
                st = os.fstat(handle.fileno())
                text = handle.read().decode("utf-8")
        except FileNotFoundError:
            return [], None
        except OSError as exc:
            raise LimitsFileUnreadable(
                f"cannot read the tenant limits file {self.path}: {exc}"
            ) from None
        except UnicodeDecodeError as exc:
            raise LimitsFileError(
                f"the tenant limits file {self.path} is not UTF-8: {exc}"
            ) from None
        return parse(text, str(self.path)), (st.st_ino, st.st_size, st.st_mtime_ns)

    def update(
        self, change: Callable[[list[TenantOverride]], list[TenantOverride]]
    ) -> tuple[list[TenantOverride], Signature | None]:
        """``change`` applied under the lock (a missing file: no overrides) and written; the
        overrides written and the signature taken under the same lock (``KeyFile.update``)."""
        with self._locked():
            changed = change(self.read()[0])
            self._write(render(changed))
            return changed, self.signature()


@dataclass(frozen=True)
class _Snapshot:
    by_tenant: Mapping[str, TenantOverride]
    budgeted: bool  # a tenant has a budget of its own


def _snapshot(overrides: list[TenantOverride]) -> _Snapshot:
    budgeted = any(o.setting(name) not in (None, UNLIMITED) for o in overrides for name in BUDGETS)
    return _Snapshot({o.tenant: o for o in overrides}, budgeted)


def _reloaded(limits_file: LimitsFile) -> tuple[_Snapshot, Signature | None]:
    """The limits file read again (a missing one: no override)."""
    overrides, signature = limits_file.read()
    return _snapshot(overrides), signature


class TenantLimitStore:
    """The limits file as this router last read it, re-read when it changed as ``KeyStore``
    reads the key file (``polled_file.PolledFile``): an admit looks at the file at most every
    ``poll_s`` (one ``stat``) and never waits for it; a change is re-read in a worker thread,
    the limits read last in force until the new ones are swapped in whole."""

    def __init__(
        self,
        path: Path,
        monotonic: Callable[[], float],
        wall: Callable[[], float],
        poll_s: float,
        start: Start | None = None,
    ) -> None:
        """``monotonic`` paces the checks for changes, ``wall`` stamps the changes; ``start``
        runs a re-read off the event loop (default: in a thread of its own). Reads the file
        now: a malformed one raises ``LimitsFileError`` (the router stops)."""
        self._file = limits_file = LimitsFile(path)
        self._wall = wall
        overrides, signature = self._file.read()
        # One change or re-read at a time, each showing the file as it was then (KeyStore's
        # reason: a slower one must not show an older file over a newer one)
        self._limits: PolledFile[_Snapshot] = PolledFile(
            FileSource(self._file, lambda _last: _reloaded(limits_file)),
            (_snapshot(overrides), signature),
            monotonic=monotonic,
            poll_s=poll_s,
            start=start or in_a_thread("cachemesh-limits-reload"),
            log=log,
            what="tenant limits file",
            contents="limits",
            unreadable=LimitsFileUnreadable,
            malformed=LimitsFileError,
            loaded=lambda limits: (
                f"tenant limits reloaded: {len(limits.by_tenant)} tenants with limits of their own"
            ),
            gone_is_read=True,  # a limits file removed: no tenant has limits of its own
        )

    @property
    def path(self) -> Path:
        return self._file.path

    def override(self, tenant: str) -> TenantOverride | None:
        return self._limits.current().by_tenant.get(tenant)

    async def fresh_override(self, tenant: str) -> TenantOverride | None:
        """``override``, after the re-read of a change seen now or being read (at most
        ``polled_file.FRESH_WAIT_S``): an admit holds a tenant to the limits the file says,
        not to those it said before a change this router had not yet read."""
        return (await self._limits.fresh()).by_tenant.get(tenant)

    def overrides(self) -> list[TenantOverride]:
        return sorted(self._limits.current().by_tenant.values(), key=lambda o: o.tenant)

    def any_budget(self) -> bool:
        """Whether a tenant has a daily or monthly budget of its own."""
        return self._limits.current().budgeted

    def change(self, tenant: str, changes: Mapping[str, Change]) -> TenantOverride | None:
        """Makes ``changes`` to ``tenant``'s override (its line removed once it overrides
        nothing); the override now, or None. Blocks (the lock, an fsync): a worker thread's."""
        if error := tenant_error(tenant):
            raise LimitValueError(error)
        now = self._wall()
        TenantOverride(tenant).changed(changes, now)  # checked before the file is locked
        result: list[TenantOverride | None] = []

        def apply(overrides: list[TenantOverride]) -> list[TenantOverride]:
            others = [o for o in overrides if o.tenant != tenant]
            old = next((o for o in overrides if o.tenant == tenant), TenantOverride(tenant))
            new = old.changed(changes, now)
            result.append(None if new.empty else new)
            return others if new.empty else [*others, new]

        def written(_: _Snapshot) -> tuple[_Snapshot, Signature | None]:
            overrides, signature = self._file.update(apply)
            return _snapshot(overrides), signature

        self._limits.write(written)
        return result[-1]


@dataclass(frozen=True)
class PerTenantPolicies:
    """The limiter's ``Policies``: a tenant's override applied to the router's settings."""

    defaults: LimitPolicy
    store: TenantLimitStore

    def for_tenant(self, tenant: str) -> LimitPolicy:
        return self._applied(self.store.override(tenant))

    async def admitting(self, tenant: str) -> LimitPolicy:
        return self._applied(await self.store.fresh_override(tenant))

    def _applied(self, own: TenantOverride | None) -> LimitPolicy:
        return self.defaults if own is None else own.applied_to(self.defaults)

    def counts_every_spend(self) -> bool:
        """While any budget is set (the router's, or a tenant's own), every tenant's cost is
        counted, those with no limit too: a budget given to one later applies to what it
        spent already in the period. With no budget anywhere nothing is counted (as before
        per-tenant limits), so a first budget counts from when it is set."""
        return self.defaults.budgeted or self.store.any_budget()
