"""A server interceptor's wrapped handler, made once a method instead of on every call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc


class HandlerMemo:
    """A method's handler as ``wrap`` makes it, made once for the handler it wraps and again
    when the method's handler is another one (an interceptor inside it answered with a
    refusal's handler): one entry a method the server registered (a method it does not has no
    handler, so no entry, whatever names callers send)."""

    def __init__(
        self,
        wrap: Callable[[grpc.RpcMethodHandler[Any, Any], str], grpc.RpcMethodHandler[Any, Any]],
    ) -> None:
        self._wrap = wrap
        self._made: dict[str, tuple[Any, grpc.RpcMethodHandler[Any, Any]]] = {}

    def of(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """``handler`` of ``method``, wrapped."""
        made = self._made.get(method)
        if made is not None and made[0] is handler:
            return made[1]
        wrapped = self._wrap(handler, method)
        self._made[method] = (handler, wrapped)
        return wrapped
