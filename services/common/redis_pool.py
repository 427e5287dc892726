"""Redis clients whose connections are bounded: each on a ``BlockingConnectionPool``, so a
burst of calls waits for a free connection (at most ``timeout_s``, its caller's own timeout)
instead of opening one more. A bare ``Redis.from_url`` pool grows to the highest concurrency
it has seen and never shrinks (one burst of 300 in flight left a router with 180 connections),
and a few bursts over several processes reach Redis's ``maxclients``.

Their maintenance notifications are off: push messages of Redis Enterprise/Cloud about planned
maintenance, which an open-source Redis does not send (its connections answer the handshake
"unknown subcommand"). redis-py 8.1 turns them on by default ("auto") and then does not
check a pooled connection before handing it out, so after a Redis restart every connection it
closed failed its next call (8 of 8 calls; a tenant over its budget admitted meanwhile, an
answer recorded in the ledger not found).

A health check has a client of its own (``own_connection_redis``): one connection no call
shares, so a pool whose connections are all busy (``pool_exhausted``) is not read as a Redis
that does not answer.

An error reply may be Redis's state for now rather than a refusal of the client
(``refused_for_now``): an outage to wait out, not a configuration to fix.

A URL with a password is for a Redis that asks for it: each new connection (the first, and
every reconnect) also sends the legacy ``AUTH <password>`` and needs its OK. redis-py
authenticates with ``HELLO 3 AUTH default <password>``, which a Redis WITHOUT a password
accepts (its ``default`` user is ``nopass``: any password passes), so a client whose Redis died
and whose port another, password-less Redis took (a restart, a misconfigured deployment) read
and wrote that Redis's keys with no error (5 of 5 calls answered). That Redis answers the
legacy AUTH "called without any password configured": the connection is refused
(``AuthenticationError``, naming the variable, never the password), which a service meets as
it meets a Redis that refuses its password: at start-up a ``ConfigError``, once running the
failure of a call (prefix-cache NOT_SERVING, the router's breaker and replays). A Redis whose
AUTH is renamed or disabled (``rename-command``) answers it an error whether or not it has the
password (HELLO's AUTH is not renamed with it): refused too, the refusal naming both causes and
the way out (AUTH back, or an ACL user, whose URL is not checked so). A URL with a
user other than ``default`` (an ACL user) is not checked this way: a Redis without that user
refuses the HELLO already, and a legacy AUTH would switch the connection to ``default``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import (
    AuthenticationError,
    ClusterDownError,
    OutOfMemoryError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.maint_notifications import MaintNotificationsConfig

from services.common.env import Env, check_redis_db, redis_url_error

# the connections of one client: above the 32 calls in flight the benchmarks run, with room
DEFAULT_MAX_CONNECTIONS = 64


def max_connections(env: Env, name: str) -> int:
    """``name``: the most connections each of a service's Redis clients may hold (>= 1)."""
    return env.count(name, DEFAULT_MAX_CONNECTIONS, minimum=1)


def bounded_redis(var: str, url: str, max_connections: int, timeout_s: float | None) -> Redis:
    """A client of the Redis at ``url`` (``var``'s value) holding at most ``max_connections``
    connections; a call finding them all busy waits up to ``timeout_s`` for one (then redis's
    ``ConnectionError``, a ``RedisError`` like any other failure of Redis; ``None``: as long as
    its caller waits). Closing the client closes its pool."""
    check_redis_db(var, url)
    try:
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout_s,
            # a connection Redis closed (a restart) is reconnected before use (module doc)
            maint_notifications_config=MaintNotificationsConfig(enabled=False),
            # a Redis without a password is never taken for the one the URL's is for
            redis_connect_func=password_checked(var),
        )
    except ValueError:  # its message may quote part of the password
        raise redis_url_error(var, url) from None
    return Redis.from_pool(pool)


def password_checked(var: str) -> Callable[[AbstractConnection], Awaitable[None]]:
    """A connection's handshake (redis-py's ``on_connect``) that then refuses a Redis without
    a password when the connection has one for the ``default`` user (module doc): ``var``
    named in the refusal; its callers name the Redis (without the password) around it."""

    async def on_connect(connection: AbstractConnection) -> None:
        await connection.on_connect()
        password = connection.password
        if not password or connection.username not in (None, "", "default"):
            return
        await connection.send_command("AUTH", password, check_health=False)
        # a Redis without a password answers an error (redis-py raises it or returns it); any
        # other answer but OK is never quoted (an error may echo AUTH's argument)
        try:
            reply = await connection.read_response()
        except (AuthenticationError, ResponseError) as exc:
            reply = exc
        if isinstance(reply, ResponseError):
            # unknown command: AUTH renamed or disabled (rename-command), which a Redis WITH
            # the password may do too (HELLO's AUTH is not renamed with it): the check cannot
            # tell, so both are said
            raise AuthenticationError(
                f"AUTH with the password of {var} answered an error, not OK (not quoted: it "
                f"may repeat the password): AUTH renamed or disabled on that Redis "
                f"(rename-command), which this check needs to tell it from a Redis without a "
                f"password; or not the Redis that password is for. Give that Redis its AUTH "
                f"command back, or name an ACL user in {var} (redis://USER:PASSWORD@...: not "
                f"checked with AUTH); else name the right Redis in {var}"
            )
        if reply not in (b"OK", "OK"):
            why = "it has no password" if isinstance(reply, AuthenticationError) else "not OK"
            raise AuthenticationError(
                f"AUTH with the password of {var} not accepted ({why}): not the Redis that "
                f"password is for (another Redis on its port, or one started without "
                f"requirepass); name the right Redis in {var}, or give that Redis its password"
            )

    return on_connect


def own_connection_redis(var: str, url: str, timeout_s: float | None) -> Redis:
    """A client of the Redis at ``url`` (``var``'s value) over one connection of its own, for
    a health check: the same URL, so the same password, TLS and socket timeouts as the pool's
    client, but no call waits for or holds its connection. A connection that failed (a Redis
    restart, a PING given up) is closed and made again at its next use."""
    return bounded_redis(var, url, 1, timeout_s)


def pool_exhausted(exc: BaseException) -> bool:
    """``exc`` is a ``bounded_redis`` call's wait for a connection running out (all busy for
    ``timeout_s``): the process's own bound, not a failure of Redis."""
    return isinstance(exc, RedisConnectionError) and isinstance(exc.__cause__, TimeoutError)


# the refusals a Redis makes for now, whoever asks: out of memory under ``noeviction``,
# MASTERDOWN (a replica whose master is gone, ``replica-serve-stale-data no``: a
# ClusterDownError), TRYAGAIN; LOADING is a ``BusyLoadingError``, a connection error already
_FOR_NOW = (OutOfMemoryError, ClusterDownError, TryAgainError)


def refused_for_now(exc: BaseException) -> bool:
    """``exc`` is an error reply of a Redis that cannot serve now but will (see ``_FOR_NOW``;
    BUSY: another client's script past ``busy-reply-threshold``, which redis-py raises as a
    bare ``ResponseError``), not a refusal of the client (a wrong password, no permission, a
    database it does not have)."""
    if isinstance(exc, _FOR_NOW):
        return True
    return isinstance(exc, ResponseError) and str(exc).startswith("BUSY ")


# ``INFO memory``'s policy under which a Redis at its ``maxmemory`` refuses writes (OOM)
# rather than evicting keys
NO_EVICTION = "noeviction"


class EvictionPolicyUnread(ValueError):
    """``INFO memory`` does not say the ``maxmemory-policy`` (Redis Enterprise, Redis Cloud and
    Azure's Enterprise tier publish neither ``maxmemory`` nor ``maxmemory_policy``, and default
    to ``volatile-lru``): whether the Redis evicts keys is not known, not "never"."""


async def eviction_policy(redis: Redis) -> str | None:
    """The ``maxmemory-policy`` under which ``redis`` drops keys of its own accord once full,
    read from ``INFO memory`` (which a managed Redis answers where it refuses ``CONFIG``):
    None when it never does (``noeviction``, or a ``maxmemory`` of 0: no limit). ``volatile-*``
    policies evict only keys with a TTL, which is every count, claim and record a service keeps
    there for a while; the ``allkeys-*`` ones any key. No ``maxmemory_policy`` in the answer is
    ``EvictionPolicyUnread`` (before, read as ``noeviction``: a Redis Enterprise database under
    its default ``volatile-lru`` passed unnamed); a policy that evicts with no ``maxmemory``
    said is that policy (such a service's databases all have a memory limit)."""
    info = await redis.info("memory")
    if "maxmemory" in info and int(info["maxmemory"]) == 0:
        return None  # no limit: never full
    if "maxmemory_policy" not in info:
        raise EvictionPolicyUnread("its INFO memory does not say its maxmemory_policy")
    policy = str(info["maxmemory_policy"])
    return None if policy == NO_EVICTION else policy


async def say_eviction_policy(
    redis: Redis, var: str, where: str, lost: str, timeout_s: float, log: logging.Logger
) -> None:
    """The line a service logs of its Redis's eviction policy (``eviction_policy``): an ERROR
    when it evicts keys once full ("``var``: Redis at ``where`` evicts keys once full
    (maxmemory-policy P), so ``lost``"), a WARNING when it does not say (no
    ``maxmemory_policy`` in ``INFO``, as Redis Enterprise and Redis Cloud, which default to
    ``volatile-lru``; ``INFO`` refused or renamed away; no answer within ``timeout_s``),
    nothing when it never evicts. ``where``: the address, already redacted. One piece for the
    router's Redis and prefix-cache's, which each wrote it."""
    try:
        async with asyncio.timeout(timeout_s):
            policy = await eviction_policy(redis)
    except (RedisError, OSError, TimeoutError, ValueError) as exc:
        if isinstance(exc, TimeoutError):  # asyncio's, with no message
            exc = TimeoutError(f"no answer within {timeout_s:g} s")
        log.warning(
            "%s: could not read the eviction policy of Redis at %s (%s: %s); if it evicts keys "
            "once full, %s: make sure its maxmemory-policy is noeviction",
            var,
            where,
            type(exc).__name__,
            exc,
            lost,
        )
        return
    if policy is not None:
        log.error(
            "%s: Redis at %s evicts keys once full (maxmemory-policy %s), so %s; give it "
            "maxmemory-policy noeviction",
            var,
            where,
            policy,
            lost,
        )
