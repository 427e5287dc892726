"""prefix-cache's health follows its Redis's (PREFIX_CACHE_REDIS_URL): every Commit, every
Totals and every Plan but a self-hosted row's need it, so while it does not answer the service
reports NOT_SERVING (its calls fail UNAVAILABLE; the router serves at its estimate and replays
the bills) instead of SERVING calls that all fail; SERVING again as soon as it answers.

A PING every ``PING_EVERY_S`` decides, waited for at most ``timeout_s`` (a Redis that hangs
counts as down), over a connection of its own (``own_connection_redis``): over one of the
calls' pool, a pool whose connections were all busy read as a Redis that does not answer. A
call that finds Redis failing makes the next PING at once rather than at its turn. Only the
check sets the health: a call that succeeds may not have needed Redis (a Plan of a self-hosted
row), and one that fails may have failed for itself.

Each PING is followed by a write that changes nothing (``SET`` of ``WRITE_PROBE_KEY`` with
``XX``: that key never exists): a Redis out of memory (``maxmemory`` reached under
``noeviction``) still answers PING and reads but refuses every write, so every WARM and FINAL
commit failed while the service read SERVING (the router's bill replays sent for nothing).
Refused OOM, the service is NOT_SERVING (one WARNING saying what to do) until Redis takes a
write again. Any other refusal of that write (no permission for SET under an ACL, READONLY)
is left to the PING: the commits name it.

Each check also reads ``STORE_KEY`` (never expiring), writing a new id there when it is gone,
and increments ``SEQ_KEY`` (never expiring): a Redis that lost its data lost every tenant's
totals and the commit records with it, and that was silent (Admin ``GetStats`` counted from
zero: a flush took 3 of a tenant's 13 calls, 7,821,000 nanos, out of its totals, with no line
and no metric). Two losses are seen. The whole data set (restarted without persistence,
flushed): an id not seen since this process started. Going back in time (restarted from an
older RDB snapshot, failed over to a replica that lacked the last writes; the id survives
those: a tenant's 13 calls went back to 10 with no line): an increment that returns a value
not above the one this process's last check got. Each logs an ERROR naming the Redis (without
its password) and counts ``reset`` (``cachemesh_prefix_cache_redis_store_resets_total``), once
a loss. Not seen: a loss while no prefix-cache runs (a process's first check only records what it
finds), and a rollback that loses only writes made since a process's last check (at most
``PING_EVERY_S`` of them; with several replicas, at least the first to check after the loss
among those that checked since the snapshot sees it). The increments are a process's own, so
the value never reads lower otherwise (no false alarm from several replicas).

The checks' keys (``WRITE_PROBE_KEY``, ``STORE_KEY``, ``SEQ_KEY``) are under prefix-cache's own
``cachemesh:commit:`` prefix, so a Redis user limited to prefix-cache's keys
(``~cachemesh:commit:* ~cachemesh:warm:*``) runs them; before, the write probe was outside it,
refused NOPERM, and the store check never ran (a flush went unseen). A refusal of these writes
other than out of memory (no permission, READONLY) leaves the store unchecked that time, with
one WARNING saying so until they are taken again.

At start-up, a Redis that refuses the service (a wrong password, no permission, a database it
does not have) is a ``ConfigError``; one that does not answer, or answers with a state of its
own for now (LOADING, BUSY, MASTERDOWN, TRYAGAIN: ``refused_for_now``), leaves it NOT_SERVING,
with a WARNING, until it answers. Before, MASTERDOWN (a replica with
``replica-serve-stale-data no`` whose master is gone), BUSY and TRYAGAIN stopped the start-up
(exit 2 at every restart for as long as they lasted), where a running service waits them out.
A running service whose new connection is refused (its Redis restarted with another password,
or its port taken by a Redis without one: ``redis_pool``'s check) is NOT_SERVING with a WARNING
that says so, not one that says the Redis does not answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    OutOfMemoryError,
    RedisError,
    ResponseError,
)

from services.common.background import end_if_cancelled
from services.common.env import ConfigError, redacted_url
from services.common.redis_pool import refused_for_now, say_eviction_policy

log = logging.getLogger("cachemesh.prefix_cache")

REDIS_URL = "PREFIX_CACHE_REDIS_URL"
PING_EVERY_S = 2.0  # how often the Redis is PINGed for the service's health
# set only if it exists, which it never does: refused when Redis is out of memory, else a no-op
# (under prefix-cache's own prefix, so a user limited to its keys may write it: module doc)
WRITE_PROBE_KEY = "cachemesh:commit:write-probe"
# the store's id (never expiring): gone, the Redis lost prefix-cache's state (module doc)
STORE_KEY = "cachemesh:commit:store"
# incremented by each check (never expiring): lower than a process saw, the Redis went back
SEQ_KEY = "cachemesh:commit:store:seq"


class RedisHealth:
    def __init__(
        self,
        redis: Redis,
        url: str,
        set_health: Callable[[bool], Awaitable[None]],
        timeout_s: float,
        reset: Callable[[], None] | None = None,
    ) -> None:
        """``redis``: a client of the Redis at ``url`` (named without its password) that no
        call shares (``own_connection_redis``); ``set_health``: the service's
        ``HealthSwitch.set``; ``timeout_s``: the longest a PING is waited for; ``reset``:
        told when the Redis is found to have lost prefix-cache's state (``STORE_KEY``)."""
        self._redis = redis
        self._reset = reset
        self._marks: set[bytes | str] = set()  # the store's ids seen since this process started
        self._seq: int | None = None  # ``SEQ_KEY`` as this process's last check left it
        self._unchecked = False  # the store check was refused (said once: module doc)
        self._where = redacted_url(url)  # never its password
        self._set_health = set_health
        self._timeout_s = timeout_s
        self._answering: bool | None = None  # unknown until the first PING
        self._eviction_read = False  # its eviction policy checked (when it first answers)
        # why its last NOT_SERVING: "down" (no answer), "full" (a write refused out of
        # memory), "refused" (the connection refused: a Redis without the URL's password)
        self._cause = "down"
        self._wake = asyncio.Event()

    async def start(self) -> None:
        """The start-up's PING: a refusal of the service stops it (``ConfigError``); no
        answer, or a refusal for now (``refused_for_now``), leaves it NOT_SERVING until a PING
        is answered (``run``)."""
        try:
            await self._ping()
        except (AuthenticationError, AuthorizationError, ResponseError) as exc:
            if refused_for_now(exc):
                await self._down(exc)
                return
            raise ConfigError(f"{REDIS_URL}: Redis at {self._where} refused ({exc})") from None
        except (RedisError, OSError, TimeoutError) as exc:
            await self._down(exc)
        else:
            await self._up()

    async def _eviction_checked(self) -> None:
        """An ERROR line when the Redis evicts keys once full (``eviction_policy``): every
        warm prefix and commit record prefix-cache keeps there has a TTL, so ``volatile-lru``
        (managed Redis services' default) drops them as ``allkeys-lru`` does, and an evicted
        record bills an answer twice or never. A Redis that does not say (no
        ``maxmemory_policy`` in ``INFO``, as Redis Enterprise and Redis Cloud, which default
        to ``volatile-lru``; ``INFO`` renamed away; no answer) is a WARNING saying to make sure
        of ``noeviction``. Run once a process, when the Redis first answers (``_up``): before,
        only if the start-up's PING was answered, so a Redis down at start-up was never
        checked, and a Redis Enterprise database was read as ``noeviction``."""
        await say_eviction_policy(
            self._redis,
            REDIS_URL,
            self._where,
            "warm prefixes and commit records can go without a word, and an answer is billed "
            "twice or never",
            self._timeout_s,
            log,
        )

    async def check(self) -> None:
        """One PING; the health set from its outcome, a line logged when it changes."""
        try:
            await self._ping()
        except (RedisError, OSError, TimeoutError) as exc:
            await self._down(exc)
        else:
            await self._up()

    def failed(self) -> None:
        """A call found Redis failing: the next PING is made at once (while it answered)."""
        if self._answering is not False:
            self._wake.set()

    async def run(self, every_s: float = PING_EVERY_S) -> None:
        """PINGs every ``every_s``, or at once when a call failed, until cancelled (also when
        the cancel came during a PING that swallowed it: ``end_if_cancelled``)."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(every_s):
                    await self._wake.wait()
            self._wake.clear()
            await self.check()
            end_if_cancelled()  # a cancel redis-py's send swallowed (background.py)

    async def _ping(self) -> None:
        """A PING, then a write that changes nothing (``WRITE_PROBE_KEY``), then the store's
        check; raises what Redis answered, but for a refusal of the writes other than out of
        memory (the store's check then says it could not run)."""
        async with asyncio.timeout(self._timeout_s):
            await self._redis.ping()
            try:
                await self._redis.set(WRITE_PROBE_KEY, b"", xx=True)
            except OutOfMemoryError:
                raise
            except ResponseError:  # NOPERM, READONLY: not the health's to say (module doc)
                pass
            await self._check_store()

    async def _check_store(self) -> None:
        """Writes the store's id when there is none, increments ``SEQ_KEY`` and reads both:
        an id not seen since this process started, or a count not above its last, means the
        Redis lost its data (module doc)."""
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.set(STORE_KEY, secrets.token_hex(8), nx=True)
                pipe.incr(SEQ_KEY)
                pipe.get(STORE_KEY)
                _, seq, mark = await pipe.execute()
        except OutOfMemoryError:  # the write probe says so
            return
        except ResponseError as exc:  # NOPERM, READONLY
            if not self._unchecked:
                self._unchecked = True
                log.warning(
                    "%s: Redis at %s refused prefix-cache's store check (%s): a loss of its "
                    "data (a flush, a restart without persistence or from an older snapshot) "
                    "is not seen while it does. Let its user write keys %s and %s (an ACL "
                    "key pattern cachemesh:commit:*), or name the primary in %s if READONLY",
                    REDIS_URL,
                    self._where,
                    exc,
                    STORE_KEY,
                    SEQ_KEY,
                    REDIS_URL,
                )
            return
        self._unchecked = False
        last, self._seq = self._seq, int(seq)
        gone = mark is not None and mark not in self._marks and bool(self._marks)
        back = last is not None and self._seq <= last
        if mark is not None:
            self._marks.add(mark)
        if gone:
            log.error(
                "%s: Redis at %s lost prefix-cache's data (its key %s was gone: restarted "
                "without persistence or flushed): every tenant's totals (Admin GetStats) count "
                "from zero and the commit records are gone (a FINAL whose WARM was recorded "
                "there is billed through the router's outbox). Give that Redis persistence "
                "(appendonly yes)",
                REDIS_URL,
                self._where,
                STORE_KEY,
            )
        elif back:
            log.error(
                "%s: Redis at %s went back in time (its counter %s read %d after %d: restarted "
                "from an older snapshot, or failed over to a replica that lacked the last "
                "writes): every tenant's totals (Admin GetStats) lost what was billed since "
                "and those commit records are gone (a FINAL whose WARM was recorded there is "
                "billed through the router's outbox). Give that Redis persistence (appendonly "
                "yes, appendfsync everysec or always) and fail over only to a replica in sync",
                REDIS_URL,
                self._where,
                SEQ_KEY,
                self._seq,
                last,
            )
        if (gone or back) and self._reset is not None:
            self._reset()

    async def _down(self, exc: BaseException) -> None:
        """NOT_SERVING, said once a cause: Redis not answering, out of memory, or refusing the
        connection (a Redis without the password, redis_pool's check: its port taken by
        another Redis while the service ran; before, said only as the connection it closed)."""
        if isinstance(exc, OutOfMemoryError):
            cause = "full"
        elif isinstance(exc, AuthenticationError):
            cause = "refused"
        else:
            cause = "down"
        was = self._answering
        if was is False and self._cause == cause:
            return
        self._answering, self._cause = False, cause
        if cause == "full":
            log.warning(
                "%s: Redis at %s is out of memory (maxmemory reached under noeviction: %s): "
                "NOT_SERVING until it takes a write again; every WARM and FINAL commit fails "
                "UNAVAILABLE meanwhile (the router serves at its estimate and replays the "
                "bills). Raise its maxmemory (CONFIG SET maxmemory) or free memory in it",
                REDIS_URL,
                self._where,
                exc,
            )
        elif cause == "refused":
            log.warning(
                "%s: Redis at %s refuses prefix-cache's connection (%s): NOT_SERVING until it "
                "takes it; Plan, Commit and Totals fail UNAVAILABLE meanwhile (the router "
                "serves at its estimate and replays the bills)",
                REDIS_URL,
                self._where,
                exc,
            )
        else:
            if isinstance(exc, TimeoutError):  # asyncio's, with no message
                exc = TimeoutError(f"no answer within {self._timeout_s:g} s")
            log.warning(
                "%s: Redis at %s does not answer or cannot serve now (%s: %s): NOT_SERVING "
                "until it does; Plan, Commit and Totals fail UNAVAILABLE meanwhile (the router "
                "serves at its estimate and replays the bills)",
                REDIS_URL,
                self._where,
                type(exc).__name__,
                exc,
            )
        if was is not False:
            await self._set_health(False)

    async def _up(self) -> None:
        if self._answering is True:
            return
        if self._answering is False:
            log.warning("%s: Redis at %s answers again: SERVING", REDIS_URL, self._where)
        self._answering = True
        await self._set_health(True)
        if not self._eviction_read:  # once a process, whenever the Redis first answers
            self._eviction_read = True
            await self._eviction_checked()
