"""The front's bound on open connections, checked against the process's open-file limit at
start-up, and the one log line an interval while the process has no file handle left.

Without a bound, idle or half-sent connections held the front's file handles until none was
left: then no caller was answered, and asyncio's accept loop logged a traceback per try
("socket.accept() out of system resource": 696,401 of them, 310 MB of log in 20 s)."""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Callable
from typing import Any

from services.common.clock import Clock, Throttle, suppressed
from services.common.env import ConfigError

log = logging.getLogger("cachemesh.http_front")

MAX_CONNECTIONS = "HTTP_FRONT_MAX_CONNECTIONS"
# file handles the front needs besides its callers' connections: its Gateway channel, the
# metrics port, logs, a burst of connections accepted above the cap before they are closed
RESERVED_FILES = 256
ACCEPT_ERROR = "socket.accept() out of system resource"  # asyncio's message
LOG_EVERY_MS = 10_000

Limits = tuple[int, int]


def fit_open_files(
    max_connections: int,
    chosen: bool = True,
    get: Callable[[], Limits] = lambda: resource.getrlimit(resource.RLIMIT_NOFILE),
    set_soft: Callable[[Limits], None] = lambda v: resource.setrlimit(resource.RLIMIT_NOFILE, v),
) -> int:
    """The connections the front may hold open at once: ``max_connections``, the process's
    open-file limit made room for them and for the front's own files (the soft limit raised,
    up to the hard limit, when it is lower). A hard limit too low for them: a ``ConfigError``
    naming ``HTTP_FRONT_MAX_CONNECTIONS`` when the operator ``chosen`` that figure; else (the
    default) the cap lowered to what the limit holds, with a WARNING, so that a machine with a
    low hard limit (4,096 on some hosts) still starts."""
    soft, hard = get()
    needed = max_connections + RESERVED_FILES
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return max_connections
    refused = ConfigError(
        f"{MAX_CONNECTIONS} ({max_connections}) needs {needed} file handles with the "
        f"{RESERVED_FILES} the front keeps for itself, above this process's open-file limit "
        f"(RLIMIT_NOFILE: {soft}, at most {_limit(hard)}); lower {MAX_CONNECTIONS} or raise "
        "the limit (ulimit -n; compose: ulimits nofile)"
    )
    if hard != resource.RLIM_INFINITY and hard < needed:
        if chosen or hard <= RESERVED_FILES:
            raise refused
        lowered = hard - RESERVED_FILES
        log.warning(
            "http-front: at most %d connections at once, not the default %d: this process "
            "may open %d files (RLIMIT_NOFILE's hard limit), %d of them kept for the front "
            "itself; raise the limit (ulimit -Hn; compose: ulimits nofile) or set %s",
            lowered,
            max_connections,
            hard,
            RESERVED_FILES,
            MAX_CONNECTIONS,
        )
        max_connections, needed = lowered, hard
    try:
        set_soft((needed, hard))
    except (OSError, ValueError):  # above the kernel's own bound (fs.nr_open)
        raise refused from None
    log.info(
        "http-front: open-file limit raised from %d to %d for %s", soft, needed, MAX_CONNECTIONS
    )
    return max_connections


def _limit(value: int) -> str:
    return "unlimited" if value == resource.RLIM_INFINITY else str(value)


class AcceptErrors:
    """The event loop's exception handler while the front serves: asyncio's "out of system
    resource" accept failure is logged at most once an interval, without its traceback,
    with the count left out; anything else goes to the handler that was there before."""

    def __init__(self, clock: Clock, interval_ms: int = LOG_EVERY_MS) -> None:
        self._throttle = Throttle(clock, interval_ms)
        self._interval_ms = interval_ms
        self._previous: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._previous = loop.get_exception_handler()
        loop.set_exception_handler(self._handle)

    def uninstall(self) -> None:
        if self._loop is not None:
            self._loop.set_exception_handler(self._previous)
            self._loop = None

    def _handle(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") != ACCEPT_ERROR:
            if self._previous is not None:
                self._previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        due = self._throttle.due()
        if due:
            log.error(
                "http-front: %s (%s): no caller is answered while the process has no file "
                "handle left; lower %s below its open-file limit or raise that limit%s",
                ACCEPT_ERROR,
                context.get("exception"),
                MAX_CONNECTIONS,
                suppressed(due, self._interval_ms),
            )
