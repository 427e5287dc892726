"""A service's background tasks ended at its stop, within a bound: each is cancelled, and the
stop waits for them at most ``bound_s``. One that takes its cancel and keeps running (a loop
that catches ``CancelledError``, a call that shields itself) is abandoned, named in one ERROR
line, so a stop always ends; waiting with no bound, such a task held the stop forever.

A loop of its own checks for a cancel lost under it (``end_if_cancelled``) at each turn: a
library call may swallow one. redis-py sends each command under ``asyncio.wait_for`` (its
socket timeout), and Python 3.11's ``wait_for`` returns the inner call's outcome, dropping the
cancel, when that call ends in the same turn of the event loop as the cancel comes (fixed in
3.12). The task then reads ``cancelling()`` but is thrown nothing more: a loop went on for
ever (prefix-cache's Redis health: a test awaiting its end hung in 3 of 5 runs). A request on
its way to a model call checks the same way right after each such call (``unless_cancelled``),
or goes on to the model call for a caller that left."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Coroutine, Sequence
from typing import Any, TypeVar

log = logging.getLogger("cachemesh.server")

# how long a stop waits for its cancelled background tasks: a task that honours its cancel
# ends at its next await, so this only ever delays a stop for one that does not
TASKS_END_S = 1.0


_Task = TypeVar("_Task", bound="asyncio.Future[Any]")
_T = TypeVar("_T")


async def cancel_within(tasks: Sequence[_Task], bound_s: float, what: str) -> list[_Task]:
    """Cancels ``tasks`` and waits at most ``bound_s`` for them to end; returns those still
    running then (abandoned: left to the event loop's close). ``what``: the stop, for the
    log. A task that had failed is logged with its error (its error is not the stop's)."""
    for task in tasks:
        task.cancel()
    if not tasks:
        return []
    done, running = await asyncio.wait(tasks, timeout=bound_s)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: task %s had failed: %s", what, _name(task), task.exception())
    left = [task for task in tasks if task in running]
    if left:
        log.error(
            "%s: %d background task(s) still running %.1f s after their cancel, abandoned: %s",
            what,
            len(left),
            bound_s,
            ", ".join(_name(task) for task in left),
        )
    return left


def end_if_cancelled() -> None:
    """Raises ``CancelledError`` if the running task was cancelled and that cancel was lost
    under it (module doc): for a loop to call at each turn, so it ends at its next one."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def unless_cancelled(call: Awaitable[_T]) -> _T:
    """``call``'s outcome, unless the running task was cancelled while it ran and that cancel
    was lost under it (module doc): then ``CancelledError``, whatever ``call`` returned or
    raised, so its caller ends here, not after what it does next with that outcome."""
    try:
        result = await call
    except Exception:
        end_if_cancelled()
        raise
    end_if_cancelled()
    return result


async def to_the_end(
    work: Coroutine[Any, Any, _T], said: tuple[type[BaseException], ...] = ()
) -> _T:
    """``work``'s outcome, run in a task of its own that a cancel of the caller (its deadline
    passed, its client went) does not stop: for a change made durable in a worker thread,
    which cannot be stopped, and applied once it is. Cancelled midway, such a change was
    durable but not applied (a policy on disk the process did not follow), or its failure
    went unread (an fsync's EIO, which no later fsync reports). The caller's
    ``CancelledError`` is raised all the same; what ``work`` then raises is read: an error of
    a type in ``said`` (one said where it was raised) quietly, any other logged."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(lambda done: _read_outcome(done, said))
        raise


def _read_outcome(task: asyncio.Future[Any], said: tuple[type[BaseException], ...]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None and not isinstance(exc, said):
        log.error("%s, whose caller had gone, failed", _name(task), exc_info=exc)


def _name(task: asyncio.Future[Any]) -> str:
    return task.get_name() if isinstance(task, asyncio.Task) else repr(task)
