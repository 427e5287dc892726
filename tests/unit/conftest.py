"""Fixtures shared by the unit tests: the warm-prefix stores, in memory and in a real Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis

from services.prefix_cache.redis_store import RedisWarmStore
from services.prefix_cache.warm import InMemoryWarmStore, WarmStore
from tests.redis_server import redis_server


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(params=["memory", "redis"])
async def warm_store(request: pytest.FixtureRequest) -> AsyncIterator[WarmStore]:
    """Each store in turn: every test using it runs against both."""
    if request.param == "memory":
        yield InMemoryWarmStore()
        return
    client = Redis.from_url(request.getfixturevalue("redis_url"))
    await client.flushdb()
    try:
        yield RedisWarmStore(client)
    finally:
        await client.aclose()
