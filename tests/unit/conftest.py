"""Fixtures shared by the unit tests: the prefix-cache stores, in memory and in a real Redis.

``backend`` is parametrized once, and the warm store and the commit ledger of a test both come
from it, so every test using either runs twice: all in memory, then all in one real Redis.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from redis.asyncio import Redis

from services.common import server as server_module
from services.common.logs import _Handler as ServiceLogHandler
from services.http_front import app as http_front_app
from services.http_front import http_server
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


def _no_stop_handlers(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """In a test, the stop signals stay pytest's: a test stops its service by ``stop``."""


@pytest.fixture(autouse=True)
def _stop_signals_left_to_pytest(monkeypatch: pytest.MonkeyPatch) -> None:
    """A service run in this process (``run_service``, the HTTP front's ``serve``) installs no
    SIGTERM/SIGINT handlers: they are the pytest process's. Its handlers took the first
    SIGTERM sent to end a hung run as its own ``stop`` (the process went on: reproduced, rc 0;
    test_server_drain's hang was killed after 11 min), and a test's end left SIG_DFL in place
    of what pytest had. ``test_start_up_sigterm`` sends the signals to ``run_main``'s handlers
    in a process of its own; those ``run_service`` and ``serve`` install are tested nowhere."""
    for module in (server_module, http_front_app):
        monkeypatch.setattr(module, "stop_on_signals", _no_stop_handlers)


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


SMALL_BUFFER = 4096  # bytes: a socket buffer a few hundred small answers fill


@pytest.fixture
def small_send_buffers(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The front's sockets get a send buffer of 4 KiB (the kernel's own grows to 4 MB on
    loopback): what a caller leaves unread then stays in the front's buffer after a few
    answers, not after 4 MB of them, so the test sends a few hundred requests, not 30,000
    (the caller's own receive window: ``test_http_front_app.small_window``)."""
    made = http_server._Handler.connection_made

    def connection_made(self: http_server._Handler, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
        made(self, transport)

    monkeypatch.setattr(http_server._Handler, "connection_made", connection_made)
    yield
