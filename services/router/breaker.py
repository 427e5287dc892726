"""A dependency left alone across requests once its calls failed in a row, so that requests stop
paying a timeout each while it stays hung: prefix-cache (``ROUTER_PREFIX_BREAKER_S``),
semantic-cache's Lookups (``ROUTER_SEMANTIC_BREAKER_S``) and the router's Redis clients, the
limits' and the answer ledger's (``ROUTER_REDIS_BREAKER_S``).

After ``BREAKER_AFTER`` failures in a row, no call for ``open_s`` (0: never left alone); then
one call tries it (half-open), the others still skipping it until that one answers (the run
ends: every call is made again) or fails (left alone again at once); a trial that never
reports (its caller left) lets another call try after ``open_s`` more.

Each breaker logs alike, so that a dependency hung for an hour is two lines, not one per
trial (720 at 5 s): one WARNING as a run of failures first leaves it alone (a hang starts),
DEBUG at each re-open after a failed trial, one INFO when it answers again.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Literal, get_args

log = logging.getLogger("cachemesh.router")

BREAKER_AFTER = 3  # failures in a row that leave a dependency alone
# the router's Redis clients, each with a breaker (``cachemesh_router_redis_breaker_opens_total``)
RedisClient = Literal["limits", "answer_ledger"]
REDIS_CLIENTS: tuple[RedisClient, ...] = get_args(RedisClient)
# the services the router leaves alone once hung, as ``cachemesh_router_degraded_total`` names
# them: each hang counted in ``cachemesh_router_breaker_opens_total{dependency}``
Dependency = Literal["prefix-cache", "semantic-cache"]
DEPENDENCIES: tuple[Dependency, ...] = get_args(Dependency)


def _nothing(*_: object) -> None:
    pass


class Breaker:
    def __init__(
        self,
        open_s: float,
        clock: Callable[[], float],
        opened: Callable[[int, bool], None] = _nothing,
        closed: Callable[[int], None] = _nothing,
    ) -> None:
        """``clock``: seconds (monotonic); ``opened``: told of each time it leaves the
        dependency alone, with the failures in a row and whether this run of them had left it
        alone before (a call tried after ``open_s`` failed again); ``closed``: told when an
        answer ends a run of failures that had left it alone, with their number."""
        self._open_s = open_s
        self._clock = clock
        self._opened = opened
        self._closed = closed
        self._failures = 0
        self._tripped = False  # this run of failures left the dependency alone
        self._until = -math.inf
        self._trial_until = -math.inf  # a call tries it after the wait, others skip until then

    def open(self) -> bool:
        """No call now: the dependency is left alone. After the wait, the first caller is
        told False (it tries the dependency) and the others True until it reports."""
        now = self._clock()
        if now < self._until:
            return True
        if not self._tripped:
            return False
        if now < self._trial_until:
            return True
        self._trial_until = now + self._open_s
        return False

    def skips(self) -> bool:
        """Whether a call now would be skipped, as ``open`` would say, without claiming the
        half-open trial: a check before the call that ``open`` then gates (asking ``open``
        twice would give the trial to the check and skip the call, the breaker tripped
        another ``open_s``)."""
        now = self._clock()
        if now < self._until:
            return True
        return self._tripped and now < self._trial_until

    @property
    def tripped(self) -> bool:
        """A run of failures left the dependency alone and no call has answered since (also
        while one call tries it): unlike ``open``, asking claims no trial."""
        return self._tripped

    def failed(self) -> None:
        self._failures += 1
        now = self._clock()
        if self._open_s > 0 and self._failures >= BREAKER_AFTER and now >= self._until:
            self._until = now + self._open_s
            self._trial_until = -math.inf
            again, self._tripped = self._tripped, True
            self._opened(self._failures, again)

    def answered(self) -> None:
        if self._tripped:
            self._closed(self._failures)
        self._failures = 0
        self._tripped = False
        self._trial_until = -math.inf


def _dependency_breaker(
    dependency: Dependency,
    retried: str,
    opening: str,
    answering: str,
    open_s: float,
    clock: Callable[[], float],
    hung: Callable[[Dependency], None],
) -> Breaker:
    """``dependency`` left alone across requests after timeouts in a row (``open_s``): one
    WARNING line (``opening``, with the run's length and ``open_s``) as a run of them first
    leaves it alone, DEBUG (``retried``, with ``open_s``) at each trial that times out, one
    INFO line (``answering``, with the run's length) when it answers again; ``hung``: told as a
    hang starts (the metric), not at its re-opens."""

    def opened(timeouts: int, again: bool) -> None:
        if again:
            log.debug(retried, open_s)
            return
        hung(dependency)
        log.warning(opening, timeouts, open_s)

    def closed(timeouts: int) -> None:
        log.info(answering, timeouts)

    return Breaker(open_s, clock, opened, closed)


def prefix_breaker(
    open_s: float, clock: Callable[[], float], hung: Callable[[Dependency], None] = _nothing
) -> Breaker:
    """prefix-cache left alone (ROUTER_PREFIX_BREAKER_S): its answers estimated meanwhile, their
    bills kept in the billing outbox."""
    return _dependency_breaker(
        "prefix-cache",
        "prefix-cache: a call tried after %g s timed out; left alone",
        "prefix-cache: %d calls timed out in a row; no calls for %g s at a time "
        "(ROUTER_PREFIX_BREAKER_S) until one answers: answers are estimated, their bills "
        "kept in the billing outbox",
        "prefix-cache answers again after %d timeouts in a row",
        open_s,
        clock,
        hung,
    )


def semantic_breaker(
    open_s: float, clock: Callable[[], float], hung: Callable[[Dependency], None] = _nothing
) -> Breaker:
    """semantic-cache's Lookups left alone (ROUTER_SEMANTIC_BREAKER_S): requests answered by
    the model meanwhile, their answers not stored."""
    return _dependency_breaker(
        "semantic-cache",
        "semantic-cache: a Lookup tried after %g s timed out; left alone",
        "semantic-cache: %d Lookups in a row timed out; no Lookup sent for %g s at a time "
        "(ROUTER_SEMANTIC_BREAKER_S) until one answers: requests are answered by the model, "
        "their answers not stored (no L1 hits meanwhile)",
        "semantic-cache answers again after %d Lookups in a row timed out; Lookups and "
        "Stores sent as usual",
        open_s,
        clock,
        hung,
    )


# what the requests go without while a client's Redis is left alone, as when it fails
MEANWHILE: dict[RedisClient, tuple[str, str]] = {
    "limits": ("limits", "requests are admitted without their limits, their counts queued for it"),
    "answer_ledger": (
        "answer ledger",
        "requests are served without their answer-once protection across routers",
    ),
}


def redis_breaker(
    client: RedisClient,
    open_s: float,
    opened: Callable[[RedisClient], None] = _nothing,
    clock: Callable[[], float] = time.monotonic,
) -> Breaker:
    """``client``'s breaker over its Redis (``open_s``: ROUTER_REDIS_BREAKER_S), logging as the
    others do (a WARNING line as a run of failures first leaves that Redis alone, DEBUG at each
    re-open, an INFO line when it answers again); ``opened``: told of each time it is left
    alone, re-opens too (``cachemesh_router_redis_breaker_opens_total`` kept its meaning)."""
    name, meanwhile = MEANWHILE[client]

    def left_alone(failures: int, again: bool) -> None:
        opened(client)
        if again:
            log.debug("%s Redis: a call tried after %g s failed; left alone", name, open_s)
        else:
            log.warning(
                "%s Redis: %d calls in a row failed or did not answer; not called for %g s "
                "at a time (ROUTER_REDIS_BREAKER_S) until one answers: %s",
                name,
                failures,
                open_s,
                meanwhile,
            )

    def answers(failures: int) -> None:
        log.info(
            "%s Redis answers again after %d calls in a row failed; called as usual",
            name,
            failures,
        )

    return Breaker(open_s, clock, left_alone, answers)
