"""A status is not sent to a call that is over.

A handler that aborts a call its caller's deadline has passed (or its caller left), before
gRPC has cancelled the handler (a busy event loop: the handler found out first, from a call of
its own given the same deadline), had gRPC's ``ExecuteBatchError``, which the last resort
(``wire``) took for a bug: an ERROR with its traceback, an abort again, and gRPC's own ERROR
"Abort already called!" (17 such pairs in 300 calls with a 30 ms deadline). ``abort`` sends
the status only to a call still open; for one that is over it keeps the status on the context
(the access log, the span), logs a DEBUG line, and ends the handler as gRPC ends a cancelled
one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any, NoReturn

import grpc

log = logging.getLogger("cachemesh.wire")

Metadata = Sequence[tuple[str, str | bytes]]


def call_over(context: grpc.aio.ServicerContext[Any, Any]) -> bool:
    """The call has ended or can no longer be answered: done, or its deadline has passed
    (gRPC may not have told the handler yet)."""
    if context.done():
        return True
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


def raised_by_grpc(exc: BaseException) -> bool:
    """``exc`` is gRPC's own (its batch on a finished call failed, an abort repeated)."""
    return type(exc).__module__.startswith("grpc")


def unsent(
    context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, details: str
) -> NoReturn:
    """Ends the handler of a call that is over, its status kept but not sent."""
    context.set_code(code)
    context.set_details(details)
    log.debug(
        "%s not sent: the call was over (its deadline passed, or its caller left): %s",
        code.name,
        details,
    )
    raise asyncio.CancelledError


async def abort(
    context: grpc.aio.ServicerContext[Any, Any],
    code: grpc.StatusCode,
    details: str,
    trailing_metadata: Metadata = (),
) -> NoReturn:
    """``context.abort``, unless the call is over (``unsent``)."""
    if call_over(context):
        unsent(context, code, details)
    try:
        if trailing_metadata:
            await context.abort(code, details, trailing_metadata=trailing_metadata)
        await context.abort(code, details)
    except grpc.aio.AbortError:
        raise
    except Exception as exc:
        if raised_by_grpc(exc) and call_over(context):  # it ended as the status went
            unsent(context, code, details)
        raise
