"""``Code`` (the cores' status codes) to and from ``grpc.StatusCode``, and the servicers' way
to answer an API call or abort it with its status."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, NoReturn, TypeVar

import grpc

from services.common.errors import MARK_KEY, Code, RequestError

T = TypeVar("T")


def grpc_code(code: Code) -> grpc.StatusCode:
    return grpc.StatusCode[code.name]


def code_of(status: grpc.StatusCode) -> Code:
    return Code[status.name]


async def abort(
    context: grpc.aio.ServicerContext[Any, Any],
    code: grpc.StatusCode,
    message: str,
    mark: str = "",
) -> NoReturn:
    """Aborts with ``code`` and ``message``; a ``mark`` (``RequestError.mark``) in the
    ``MARK_KEY`` trailer."""
    await context.abort(code, message, trailing_metadata=((MARK_KEY, mark),) if mark else ())
    raise AssertionError("context.abort returned")  # pragma: no cover


async def answered(context: grpc.aio.ServicerContext[Any, Any], call: Awaitable[T]) -> T:
    """The API call's reply; a ``RequestError`` it raises becomes the call's gRPC status (its
    ``mark`` a trailer)."""
    try:
        return await call
    except RequestError as exc:
        await abort(context, grpc_code(exc.code), exc.message, exc.mark)
