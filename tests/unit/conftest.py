"""Fixtures shared by the unit tests: the prefix-cache stores, in memory and in a real Redis.

``backend`` is parametrized once, and the warm store and the commit ledger of a test both come
from it, so every test using either runs twice: all in memory, then all in one real Redis.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from redis.asyncio import Redis

from services.common.logs import _Handler as ServiceLogHandler
from services.prefix_cache.commit_records import CommitRecords
from services.prefix_cache.ledger import CommitLedger, InMemoryLedger
from services.prefix_cache.redis_ledger import RedisCommitLedger
from services.prefix_cache.redis_store import RedisWarmStore
from services.prefix_cache.totals import TotalsLedger
from services.prefix_cache.warm import InMemoryWarmStore, WarmStore
from tests.redis_server import client_of, redis_server

LedgerFactory = Callable[[int], CommitLedger]  # record TTL in ms -> a ledger


@pytest.fixture(autouse=True)
def _logging_as_found() -> Iterator[None]:
    """Each test ends with the logging set-up it began with. ``configure_logging`` sets the
    root's and the ``cachemesh`` logger's levels and installs its handler for the whole process,
    as a service's start must; a test that starts a service in process would otherwise leave
    them to every later test (a level above DEBUG on ``cachemesh`` hid later tests' lines)."""
    root, ours = logging.getLogger(), logging.getLogger("cachemesh")
    levels = (root.level, ours.level)
    handlers = list(root.handlers)
    flags = (logging.logThreads, logging.logProcesses, logging.logMultiprocessing)
    yield
    for handler in [h for h in root.handlers if isinstance(h, ServiceLogHandler)]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(levels[0])
    ours.setLevel(levels[1])
    logging.logThreads, logging.logProcesses, logging.logMultiprocessing = flags


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def redis_client(backend: str, request: pytest.FixtureRequest) -> AsyncIterator[Redis | None]:
    """A client of the real server, emptied first; None for the in-memory backend. Each call
    bounded (``redis_server.client_of``): a server left stopped fails the test, never hangs it."""
    if backend == "memory":
        yield None
        return
    client = client_of(request.getfixturevalue("redis_url"))
    await client.flushdb()
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def warm_store(redis_client: Redis | None) -> WarmStore:
    """Each store in turn: every test using it runs against both."""
    return InMemoryWarmStore() if redis_client is None else RedisWarmStore(redis_client)


@pytest.fixture
def make_ledger(redis_client: Redis | None) -> LedgerFactory:
    """Builds the backend's commit ledger (records + totals) with a record TTL in ms."""

    def build(ttl_ms: int) -> CommitLedger:
        if redis_client is None:
            return InMemoryLedger(CommitRecords(ttl_ms), TotalsLedger())
        return RedisCommitLedger(redis_client, ttl_ms)

    return build
