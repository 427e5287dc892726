"""prefix-cache's start-up names a PREFIX_CACHE_REDIS_URL Redis that evicts keys once full, at
ERROR, with its policy: every warm prefix and commit record it keeps there has a TTL, so
``volatile-lru`` (managed Redis services' default) drops them as ``allkeys-lru`` does, and an
evicted record bills an answer twice or never (its README requires ``noeviction``; nothing
checked it). A Redis without ``maxmemory``, or under ``noeviction``, is not named. Against real
redis-servers (tests/redis_server.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from services.common.redis_pool import own_connection_redis
from services.prefix_cache.redis_health import REDIS_URL, RedisHealth
from tests.redis_server import redis_server


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
    evicting = ("--maxmemory", "8mb", "--maxmemory-policy", "volatile-lru")
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
