"""What the front answers while it stops (a restart or a deploy): a model request that arrives
once the drain has begun (``DRAINING``), and a non-streaming request still waiting on the
Gateway when CACHEMESH_GRACE_S runs out (``Waiting.cut``, ``CUT``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from cachemesh.v1 import gateway_pb2 as pb
from services.http_front.errors import ApiError
from services.http_front.gateway import Gateway

# The answer of a non-streaming request still waiting on the Gateway at the end of the grace.
# The front cannot tell whether its model call had started (it may still have been queued:
# prefill queue, single-flight wait, ledger wait), so the cut stays retryable: a request that
# never reached a model is not lost, and one that did may be billed twice (said here).
CUT = (
    "the HTTP front stopped (a restart or a deploy: its CACHEMESH_GRACE_S of {grace_s:g} s ran "
    "out) before the Gateway answered; the Gateway call was cancelled. A model call of this "
    "request may have been billed for what it produced (the front cannot tell whether one had "
    "started); a retry may be billed again, and a retry with the same Idempotency-Key is "
    "answered from the Gateway's ledger only if the first call's answer was kept"
)
# the cut's retry-after: a front restarting (or another behind the same address) takes this
# long to listen again; both SDKs honour it (up to 60 s) before their retry
CUT_RETRY_AFTER_S = 5

# The answer of a model request (POST /v1/messages, /v1/chat/completions) that arrives once the
# front drains: on a keep-alive connection it had open (its listener is closed), in the drain's
# first second, when its answers still go out (``app.drain``). Started, its model call would be
# cut at the end of the grace (a bill) and retried by the caller (a second one); refused before
# the Gateway, it costs nothing and its retry, on a new connection, reaches another front.
DRAINING = (
    "the HTTP front is stopping (a restart or a deploy) and takes no new model request; this "
    "one was not sent to the Gateway (no model call, nothing billed): retry it, a new "
    "connection reaches a front still serving"
)
# the drain refusal's retry-after: the listener is closed, so a retry's new connection goes to
# another front behind the same address at once (where none is, it is refused and the SDKs
# retry a refused connection with their own backoff)
DRAIN_RETRY_AFTER_S = 1


class Waiting:
    """The handlers of the non-streaming requests waiting on the Gateway now, and those of them
    ``cut`` at the end of CACHEMESH_GRACE_S: each answers its final refusal (``CUT``) before
    its connection is closed."""

    def __init__(self, gateway: Gateway, grace_s: float) -> None:
        self._gateway = gateway
        self._grace_s = grace_s
        self._waiting: set[asyncio.Task[Any]] = set()
        self._cut: set[asyncio.Task[Any]] = set()

    def cut(self) -> int:
        """The grace is over: each non-streaming request still waiting on the Gateway cancels
        its call (the router bills what the model produced) and answers ``CUT``; how many."""
        for task in self._waiting - self._cut:
            self._cut.add(task)
            task.cancel()
        return len(self._waiting)

    async def complete(
        self,
        gw: pb.CompleteRequest,
        key: str,
        traceparent: str,
        reached: Callable[[], None] | None = None,
    ) -> pb.CompleteResponse:
        """The Gateway's answer to a non-streaming request, or ``CUT`` once the grace is over
        (``cut``): an answer, not a closed connection, and a retryable one (``retry-after``):
        the request may never have reached a model, and a retry is then its only answer."""
        task = asyncio.current_task()
        assert task is not None
        self._waiting.add(task)
        try:
            return await self._gateway.complete(gw, key, traceparent, reached)  # a cancel: it too
        except asyncio.CancelledError:
            # cut, and not also cancelled by aiohttp (the caller gone): answer, not unwind
            if task in self._cut and task.uncancel() == 0:
                raise ApiError(
                    "overloaded",
                    CUT.format(grace_s=self._grace_s),
                    retry_after_s=CUT_RETRY_AFTER_S,
                ) from None
            raise
        finally:
            self._waiting.discard(task)
            self._cut.discard(task)
