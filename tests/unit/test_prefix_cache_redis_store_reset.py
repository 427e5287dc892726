"""prefix-cache's Redis losing its data (restarted without persistence, flushed, failed over
to a replica without the last writes) took every tenant's totals and the commit records with
it, silently: Admin GetStats counted from zero (a flush in a stack took 3 of a tenant's 13
calls, 7,821,000 nanos, out of its totals) with no line and no metric. The health check reads
the store's id (``STORE_KEY``): one not seen since the process started is an ERROR naming the
Redis (never its password) and a count, once a loss. Against a real redis-server."""

from __future__ import annotations

import logging

import pytest
from redis.asyncio import Redis

from services.prefix_cache.redis_health import STORE_KEY, RedisHealth
from tests.redis_server import client_of


async def _serving(serving: bool) -> None:
    return None


async def test_a_flushed_redis_is_an_error_and_a_count_once_a_loss(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = client_of(redis_url)
    resets: list[int] = []
    try:
        await client.flushdb()
        health = RedisHealth(client, redis_url, _serving, 2.0, reset=lambda: resets.append(1))
        with caplog.at_level(logging.INFO, logger="cachemesh.prefix_cache"):
            await health.start()  # a new store: its id written, nothing lost that it saw
            await health.check()
            assert resets == [] and await client.get(STORE_KEY) is not None
            await client.flushdb()  # the Redis restarted empty
            await health.check()
            await health.check()  # the same loss, seen once
            assert resets == [1]
            errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
            assert len(errors) == 1 and "lost prefix-cache's data" in errors[0]
            assert "appendonly yes" in errors[0]
            await client.flushdb()  # a second loss
            await health.check()
            assert resets == [1, 1]
    finally:
        await client.aclose()


async def test_another_replica_s_new_id_after_a_loss_is_seen_too(redis_url: str) -> None:
    """The other prefix-cache replica's check wrote the new id first: still one loss each."""
    client = client_of(redis_url)
    seen: dict[str, int] = {"one": 0, "two": 0}
    try:
        await client.flushdb()
        one = RedisHealth(client, redis_url, _serving, 2.0, reset=lambda: _add(seen, "one"))
        two = RedisHealth(client, redis_url, _serving, 2.0, reset=lambda: _add(seen, "two"))
        await one.start()
        await two.start()
        await client.flushdb()
        await one.check()
        await two.check()
        await one.check()
        assert seen == {"one": 1, "two": 1}
    finally:
        await client.aclose()


def _add(seen: dict[str, int], name: str) -> None:
    seen[name] += 1


async def _snapshot(client: Redis) -> dict[bytes, bytes]:
    """Every key's DUMP: what an RDB taken now holds."""
    found: dict[bytes, bytes] = {}
    for key in await client.keys("*"):
        value = await client.dump(key)
        assert isinstance(key, bytes) and value is not None
        found[key] = value
    return found


async def _restore(client: Redis, snapshot: dict[bytes, bytes]) -> None:
    """The Redis comes back from ``snapshot`` (an older RDB, a lagging replica promoted)."""
    await client.flushdb()
    for key, value in snapshot.items():
        await client.restore(key, 0, value)


async def test_a_redis_back_from_an_older_snapshot_is_a_loss_once(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A Redis restarted from an older RDB (or a failover to a lagging replica) kept the store's
    id but lost every write since (the review's marker_rollback.py: a tenant's 13 calls back to
    10, 0 resets counted). Each check increments ``SEQ_KEY``; a value not above the last this
    process got is the store going back in time: an ERROR and a count, once a loss."""
    client = client_of(redis_url)
    resets: list[int] = []
    try:
        await client.flushdb()
        health = RedisHealth(client, redis_url, _serving, 2.0, reset=lambda: resets.append(1))
        await health.start()
        await health.check()
        older = await _snapshot(client)
        await client.hincrby("cachemesh:commit:totals:{t}", "calls", 3)  # written after it
        await health.check()
        await health.check()
        with caplog.at_level(logging.ERROR, logger="cachemesh.prefix_cache"):
            await _restore(client, older)
            assert await client.get(STORE_KEY) is not None  # the id survived the rollback
            await health.check()
            await health.check()  # the same loss, seen once
        assert resets == [1]
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and "older snapshot" in errors[0]
    finally:
        await client.aclose()


async def test_a_rollback_within_one_check_is_not_a_loss_seen(redis_url: str) -> None:
    """What is not seen, as the module doc says: a snapshot taken after this process's last
    check loses only writes since that check (at most ``PING_EVERY_S`` of them)."""
    client = client_of(redis_url)
    resets: list[int] = []
    try:
        await client.flushdb()
        health = RedisHealth(client, redis_url, _serving, 2.0, reset=lambda: resets.append(1))
        await health.start()
        await health.check()
        recent = await _snapshot(client)
        await _restore(client, recent)
        await health.check()
        assert resets == []
    finally:
        await client.aclose()


async def test_a_user_limited_to_prefix_cache_s_keys_still_sees_a_flush(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A Redis user given only prefix-cache's keys (``~cachemesh:commit:* ~cachemesh:warm:*``):
    the write probe was outside them (NOPERM) and the store check never ran, so a flush went
    unseen (the review's marker_acl.py: 0 resets, no line). The checks' keys are prefix-cache's
    own now; a user that may not write them is told once (a WARNING), not silently unchecked."""
    admin = client_of(redis_url)
    limited = client_of(redis_url, username="pc", password="pw")
    denied = client_of(redis_url, username="pcw", password="pw")
    resets: list[int] = []
    try:
        await admin.flushdb()
        for user, keys in (
            ("pc", ["cachemesh:commit:*", "cachemesh:warm:*"]),
            ("pcw", ["cachemesh:warm:*"]),
        ):
            await admin.acl_setuser(
                user, enabled=True, passwords=["+pw"], keys=keys, commands=["+@all"]
            )
        health = RedisHealth(limited, redis_url, _serving, 2.0, reset=lambda: resets.append(1))
        await health.start()
        await health.check()
        await admin.flushdb()
        await health.check()
        assert resets == [1]
        blind = RedisHealth(denied, redis_url, _serving, 2.0, reset=lambda: resets.append(2))
        with caplog.at_level(logging.WARNING, logger="cachemesh.prefix_cache"):
            await blind.start()
            await blind.check()
            await blind.check()
        warned = [r.getMessage() for r in caplog.records if "store check" in r.getMessage()]
        assert len(warned) == 1 and "not seen" in warned[0] and "pw" not in warned[0]
    finally:
        await admin.acl_deluser("pc", "pcw")
        for client in (admin, limited, denied):
            await client.aclose()
