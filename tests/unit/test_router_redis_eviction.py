"""The router's start-up names each of its Redis (ROUTER_LIMITS_REDIS_URL,
ROUTER_ANSWERS_REDIS_URL) that evicts keys once full, at ERROR, with its policy: every count,
hold, claim and record the router keeps there has a TTL, so ``volatile-lru`` (ElastiCache's and
Memorystore's default) evicts them as ``allkeys-lru`` does. Before, a tenant that had spent its
day's budget was admitted again (3 of 3) once other keys filled such a Redis, and nothing was
logged: the limits store's own id, which detects a flushed Redis, has no TTL and stayed. A Redis
without ``maxmemory``, or under ``noeviction``, is not named. Against real redis-servers
(tests/redis_server.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import pytest
from redis.asyncio import Redis

from services.common.clock import ManualClock
from services.common.env import Env
from services.common.models import load_model_table
from services.common.redis_pool import EvictionPolicyUnread, eviction_policy
from services.common.tokens import load_tokenizers
from services.router.limit_settings import LimitSettings
from services.router.limit_wiring import build_answer_ledger, build_limiter
from tests.redis_server import client_of, redis_server

TABLE = load_model_table()
TOKENIZERS = load_tokenizers(TABLE.models.values())
TIMEOUT_S = 10.0
EVICTING = ("--maxmemory", "8mb", "--maxmemory-policy", "volatile-lru")


async def _start_limits(url: str) -> None:
    env = Env(
        {
            "ROUTER_LIMIT_REQUESTS_PER_MIN": "2",
            "ROUTER_LIMITS_REDIS_URL": url,
            "ROUTER_LIMITS_TIMEOUT_S": str(TIMEOUT_S),
        }
    )
    limiter = await build_limiter(
        LimitSettings.from_env(env), ManualClock(1_700_000_000_000), TABLE, TOKENIZERS
    )
    await limiter.close()


async def _start_answers(url: str) -> None:
    ledger = await build_answer_ledger(url, 60.0, 4, TIMEOUT_S, lambda _: None)
    assert ledger is not None
    await ledger.close()


# each Redis the router names: its start, its variable, what its line says is lost
EACH_REDIS = pytest.mark.parametrize(
    ("start", "var", "lost"),
    [
        (_start_limits, "ROUTER_LIMITS_REDIS_URL", "admitted again"),
        (_start_answers, "ROUTER_ANSWERS_REDIS_URL", "billed again"),
    ],
    ids=["limits", "answers"],
)


def _named(caplog: pytest.LogCaptureFixture, var: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.ERROR and r.getMessage().startswith(f"{var}: ")
    ]


@EACH_REDIS
async def test_a_redis_that_evicts_keys_is_named_at_start_up_and_others_are_not(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    start: Callable[[str], Awaitable[None]],
    var: str,
    lost: str,
) -> None:
    caplog.set_level(logging.INFO)
    for name in ("evicts", "keeps0", "keeps4"):
        (tmp_path / name).mkdir()
    with redis_server(tmp_path / "evicts", extra_args=EVICTING) as url:
        await start(url)
    [message] = _named(caplog, var)
    assert "maxmemory-policy volatile-lru" in message and lost in message
    assert "maxmemory-policy noeviction" in message  # the way out
    caplog.clear()
    for args in ((), ("--maxmemory", "8mb", "--maxmemory-policy", "noeviction")):
        with redis_server(tmp_path / f"keeps{len(args)}", extra_args=args) as url:
            await start(url)
    assert _named(caplog, var) == []
    assert not [r for r in caplog.records if "eviction policy" in r.getMessage()]


@pytest.mark.parametrize(
    ("args", "policy"),
    [
        (("--maxmemory", "8mb", "--maxmemory-policy", "allkeys-lru"), "allkeys-lru"),
        (("--maxmemory", "8mb", "--maxmemory-policy", "volatile-ttl"), "volatile-ttl"),
        (("--maxmemory-policy", "allkeys-lru"), None),  # no maxmemory: nothing is evicted
        (("--maxmemory", "8mb", "--maxmemory-policy", "noeviction"), None),
    ],
)
async def test_eviction_policy_is_the_policy_only_where_keys_are_evicted(
    tmp_path: Path, args: tuple[str, ...], policy: str | None
) -> None:
    with redis_server(tmp_path, extra_args=args) as url:
        client = client_of(url)
        try:
            assert await eviction_policy(client) == policy
        finally:
            await client.aclose()


# ``INFO memory`` of a Redis Enterprise / Redis Cloud database (and Azure's Enterprise tier):
# neither ``maxmemory`` nor ``maxmemory_policy``, and a default policy of ``volatile-lru``
ENTERPRISE_INFO: dict[str, Any] = {
    "used_memory": 4_221_968,
    "used_memory_human": "4.02M",
    "used_memory_peak": 4_221_968,
    "used_memory_peak_human": "4.02M",
    "mem_fragmentation_ratio": 1,
}


class _Answers:
    """A stub Redis whose ``INFO memory`` answers ``info``."""

    def __init__(self, info: dict[str, Any]) -> None:
        self._info = info

    async def info(self, section: str) -> dict[str, Any]:
        assert section == "memory"
        return self._info


@pytest.mark.parametrize(
    ("info", "policy"),
    [
        ({"maxmemory": 8_388_608, "maxmemory_policy": "volatile-lru"}, "volatile-lru"),
        ({"maxmemory": 8_388_608, "maxmemory_policy": "noeviction"}, None),
        ({"maxmemory": 0, "maxmemory_policy": "allkeys-lru"}, None),  # no limit: never full
        ({"maxmemory": 0}, None),
        # a policy that evicts, with no maxmemory said (a managed Redis has a memory limit)
        ({"maxmemory_policy": "volatile-lru"}, "volatile-lru"),
    ],
)
async def test_eviction_policy_reads_info_memory(info: dict[str, Any], policy: str | None) -> None:
    assert await eviction_policy(cast(Redis, _Answers(info))) == policy


@pytest.mark.parametrize(
    "info", [ENTERPRISE_INFO, {"maxmemory": 8_388_608}], ids=["enterprise", "no-policy"]
)
async def test_a_policy_info_does_not_say_is_not_read_as_noeviction(info: dict[str, Any]) -> None:
    """Before, a missing ``maxmemory_policy`` read as ``noeviction``: a Redis Enterprise
    database, under its default ``volatile-lru``, was taken for one that never evicts."""
    with pytest.raises(EvictionPolicyUnread, match="maxmemory_policy"):
        await eviction_policy(cast(Redis, _Answers(info)))


def _warned(caplog: pytest.LogCaptureFixture, var: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.getMessage().startswith(f"{var}: could not read")
    ]


@EACH_REDIS
async def test_a_redis_that_does_not_say_its_policy_is_a_warning_at_start_up(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    start: Callable[[str], Awaitable[None]],
    var: str,
    lost: str,
) -> None:
    """A real Redis answering ``INFO memory`` as Redis Enterprise does: one WARNING saying what
    can go and to make sure of ``noeviction``. Before, nothing (read as ``noeviction``)."""
    caplog.set_level(logging.INFO)
    with redis_server(tmp_path) as url:

        async def enterprise(self: Redis, section: str | None = None) -> dict[str, Any]:
            assert section == "memory"
            return dict(ENTERPRISE_INFO)

        monkeypatch.setattr(Redis, "info", enterprise)
        await start(url)
    [message] = _warned(caplog, var)
    assert "EvictionPolicyUnread" in message and lost in message
    assert "make sure its maxmemory-policy is noeviction" in message
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_redis_that_does_not_answer_the_policy_in_time_is_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No answer to INFO within the timeout: the same WARNING (before, an INFO line)."""
    from services.router.limit_wiring import _eviction_checked

    class _Hangs:
        async def info(self, section: str) -> dict[str, Any]:
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

    caplog.set_level(logging.INFO)
    hangs = cast(Redis, _Hangs())
    await _eviction_checked("ROUTER_LIMITS_REDIS_URL", "redis://x:6379/0", hangs, "limits", 0.05)
    [message] = _warned(caplog, "ROUTER_LIMITS_REDIS_URL")
    assert "no answer within 0.05 s" in message and "noeviction" in message
