"""The Gateway's per-tenant limits, read from the environment once at start-up.

Each limit applies to every tenant, each tenant with its own count; unset = no such limit. A
tenant may have limits of its own over these (``tenant_limits``: the Admin API's SetLimits).
Rates are at least 1 (to refuse a tenant, remove its key); a budget of 0 refuses every request
of the period (a request is admitted while the period's bill is below the budget, before it is
known whether L1 will answer it for free).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cachemesh.dollars import PLAIN_DOLLARS, plain_dollars, whole_nanos
from services.common.env import ConfigError, Env
from services.common.redis_pool import DEFAULT_MAX_CONNECTIONS, max_connections
from services.router.limit_policy import LimitPolicy
from services.router.limits import DEFAULT_TIMEOUT_S

REQUESTS_PER_MIN = "ROUTER_LIMIT_REQUESTS_PER_MIN"
TOKENS_PER_MIN = "ROUTER_LIMIT_TOKENS_PER_MIN"
BUDGET_DAY = "ROUTER_BUDGET_USD_PER_DAY"
BUDGET_MONTH = "ROUTER_BUDGET_USD_PER_MONTH"
REDIS_URL = "ROUTER_LIMITS_REDIS_URL"
TIMEOUT_S = "ROUTER_LIMITS_TIMEOUT_S"
# each tenant's own limits over these (``tenant_limits``); unset: ``tenant-limits`` beside the
# API key file (CACHEMESH_API_KEYS_FILE)
TENANT_LIMITS_FILE = "ROUTER_TENANT_LIMITS_FILE"
REDIS_MAX_CONNECTIONS = "ROUTER_REDIS_MAX_CONNECTIONS"  # each of the router's Redis clients
REDIS_BREAKER_S = "ROUTER_REDIS_BREAKER_S"  # each of the router's Redis clients
DEFAULT_REDIS_BREAKER_S = 5.0
# The largest budget: $9M, under 2**53 nano-dollars ($9,007,199.25). The limits' Redis compares
# a period's spend with the budget in its Lua doubles, exact only below 2**53: past it a
# budget one nano-dollar above the spend read as reached (measured on Redis 7: a spend of
# 2**53 "reached" a budget of 2**53 + 1), and a budget of 10**23 dollars was taken.
MAX_BUDGET_USD = 9_000_000
TENANT_LIMITS_FILE_NAME = "tenant-limits"


@dataclass(frozen=True)
class LimitSettings:
    policy: LimitPolicy
    redis_url: str | None  # set = shared by every router through Redis; unset = this process
    timeout_s: float = DEFAULT_TIMEOUT_S  # a store's answer waited for before it counts as failed
    # the connections each of the router's Redis clients may hold (limits, answer ledger)
    redis_max_connections: int = DEFAULT_MAX_CONNECTIONS
    # each of those clients: no call for this long after its calls failed in a row (0 = never)
    redis_breaker_s: float = DEFAULT_REDIS_BREAKER_S
    # the per-tenant limits file (None: ``tenant-limits`` beside the API key file)
    tenant_limits_file: Path | None = None

    def tenant_limits_path(self, key_file: Path) -> Path:
        """The per-tenant limits file: its setting, else beside ``key_file``."""
        if self.tenant_limits_file is not None:
            return self.tenant_limits_file
        return key_file.with_name(TENANT_LIMITS_FILE_NAME)

    @classmethod
    def from_env(cls, env: Env) -> LimitSettings:
        return cls(
            policy=LimitPolicy(
                requests_per_min=_rate(env, REQUESTS_PER_MIN),
                tokens_per_min=_rate(env, TOKENS_PER_MIN),
                day_budget_nanos=_dollars(env, BUDGET_DAY),
                month_budget_nanos=_dollars(env, BUDGET_MONTH),
            ),
            redis_url=env.redis_url(REDIS_URL),
            timeout_s=env.seconds(TIMEOUT_S, DEFAULT_TIMEOUT_S, minimum=0.001),
            redis_max_connections=max_connections(env, REDIS_MAX_CONNECTIONS),
            redis_breaker_s=env.seconds(REDIS_BREAKER_S, DEFAULT_REDIS_BREAKER_S, minimum=0.0),
            tenant_limits_file=_optional_path(env, TENANT_LIMITS_FILE),
        )


def _optional_path(env: Env, name: str) -> Path | None:
    value = env.optional_str(name)
    return None if value is None else Path(value)


def _rate(env: Env, name: str) -> int | None:
    if env.optional_str(name) is None:
        return None
    return env.count(name, 0, minimum=1)


def _dollars(env: Env, name: str) -> int | None:
    """US dollars (e.g. ``25`` or ``0.50``) as whole nano-dollars (``cachemesh.dollars``: the
    rule the admin CLI's ``--day-budget`` reads by too)."""
    value = env.optional_str(name)
    if value is None:
        return None
    amount = plain_dollars(value)
    if amount is None:
        raise ConfigError(
            f"{name} must be an amount in US dollars in {PLAIN_DOLLARS}, got {value[:32]!r}"
        )
    if amount < 0:
        raise ConfigError(f"{name} must be a finite amount >= 0 US dollars, got {value!r}")
    if amount > MAX_BUDGET_USD:
        raise ConfigError(
            f"{name} must be at most {MAX_BUDGET_USD:,} US dollars (the limits' arithmetic is "
            f"exact up to there), got {value[:32]!r}"
        )
    nanos = whole_nanos(amount)
    if nanos is None:
        raise ConfigError(f"{name}: at most 9 decimal places (nano-dollars), got {value!r}")
    return nanos
