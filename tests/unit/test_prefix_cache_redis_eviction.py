"""prefix-cache's start-up names a PREFIX_CACHE_REDIS_URL Redis that evicts keys once full, at
ERROR, with its policy: every warm prefix and commit record it keeps there has a TTL, so
``volatile-lru`` (managed Redis services' default) drops them as ``allkeys-lru`` does, and an
evicted record bills an answer twice or never (its README requires ``noeviction``; nothing
checked it). A Redis without ``maxmemory``, or under ``noeviction``, is not named. Against real
redis-servers (tests/redis_server.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from services.common.redis_pool import own_connection_redis
from services.prefix_cache.redis_health import REDIS_URL, RedisHealth
from services.tools.stack.ports import free_port
from tests.redis_server import redis_server

EVICTING = ("--maxmemory", "8mb", "--maxmemory-policy", "volatile-lru")


async def _start(url: str) -> list[bool]:
    told: list[bool] = []

    async def health(serving: bool) -> None:
        told.append(serving)

    own = own_connection_redis(REDIS_URL, url, 2.0)
    try:
        await RedisHealth(own, url, health, timeout_s=10.0).start()
    finally:
        await own.aclose()
    return told


def _named(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.ERROR and r.getMessage().startswith(f"{REDIS_URL}: ")
    ]


async def test_a_redis_that_evicts_keys_is_named_at_start_up_and_others_are_not(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    evicting = EVICTING
    keeping = [(), ("--maxmemory", "8mb", "--maxmemory-policy", "noeviction")]
    for i, args in enumerate([evicting, *keeping]):
        (tmp_path / str(i)).mkdir()
        with redis_server(tmp_path / str(i), extra_args=args) as url:
            assert await _start(url) == [True]  # it serves: the line says what can go
        if i == 0:
            [message] = _named(caplog)
            assert "maxmemory-policy volatile-lru" in message and "billed twice" in message
            assert "maxmemory-policy noeviction" in message  # the way out
            caplog.clear()
    assert _named(caplog) == []
    assert not [r for r in caplog.records if "eviction policy" in r.getMessage()]


def _warned(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING
        and r.getMessage().startswith(f"{REDIS_URL}: could not read the eviction policy")
    ]


async def test_a_redis_that_does_not_say_its_policy_is_a_warning_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real Redis answering ``INFO memory`` as Redis Enterprise / Redis Cloud do (neither
    ``maxmemory`` nor ``maxmemory_policy``; their default is ``volatile-lru``): one WARNING
    saying to make sure of ``noeviction``, not one a check. Before, nothing: read as
    ``noeviction``."""
    caplog.set_level(logging.INFO)
    told: list[bool] = []

    async def health(serving: bool) -> None:
        told.append(serving)

    async def enterprise(self: Redis, section: str | None = None) -> dict[str, Any]:
        assert section == "memory"
        return {"used_memory": 4_221_968, "used_memory_human": "4.02M"}

    with redis_server(tmp_path) as url:
        monkeypatch.setattr(Redis, "info", enterprise)
        own = own_connection_redis(REDIS_URL, url, 2.0)
        try:
            checks = RedisHealth(own, url, health, timeout_s=10.0)
            await checks.start()
            await checks.check()
        finally:
            await own.aclose()
    assert told == [True]
    [message] = _warned(caplog)
    assert "make sure its maxmemory-policy is noeviction" in message
    assert "billed twice or never" in message
    assert _named(caplog) == []


async def test_a_redis_down_at_start_up_is_checked_when_it_first_answers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, the policy was read only if the start-up's PING was answered: a Redis down then
    and evicting keys once up was never named (0 lines). Now once, when it first answers, and
    not again at the next check or after it answers again."""
    caplog.set_level(logging.INFO)
    told: list[bool] = []

    async def health(serving: bool) -> None:
        told.append(serving)

    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    own = own_connection_redis(REDIS_URL, url, 2.0)
    try:
        checks = RedisHealth(own, url, health, timeout_s=2.0)
        await checks.start()  # nothing listens there yet
        assert told == [False] and _named(caplog) == []
        (tmp_path / "a").mkdir()
        with redis_server(tmp_path / "a", port=port, extra_args=EVICTING):
            await checks.check()
            await checks.check()
        await checks.check()  # down again
        (tmp_path / "b").mkdir()
        with redis_server(tmp_path / "b", port=port, extra_args=EVICTING):
            await checks.check()  # up again: said once a process
    finally:
        await own.aclose()
    assert told == [False, True, False, True]
    # (the second Redis, started empty, is also named as one that lost the data: another line)
    [message] = [m for m in _named(caplog) if "evicts keys once full" in m]
    assert "maxmemory-policy volatile-lru" in message and "billed twice" in message
