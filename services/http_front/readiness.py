"""The Gateway's health verdict as ``GET /readyz`` reads it, on the public port and the metrics
port alike: asked of the Gateway at most once a ``ttl_s`` (concurrent readers share the one
call in flight). Each anonymous ``GET /readyz`` was one health call to the router: 1,040 a
second cost the router 6.2 s of CPU in 15 s. A change of the verdict is logged, with the
Gateway's address, which the answer itself no longer names (an internal address)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("cachemesh.http_front")

READY_TTL_S = 1.0


class CachedVerdict:
    def __init__(
        self,
        check: Callable[[], Awaitable[bool]],
        clock: Callable[[], float],  # monotonic seconds
        address: str,  # the Gateway's: logged when the verdict changes
        ttl_s: float = READY_TTL_S,
    ) -> None:
        self._check = check
        self._clock = clock
        self._address = address
        self._ttl_s = ttl_s
        self._verdict: bool | None = None
        self._served = False  # the Gateway has been serving once: its changes are logged
        self._at = 0.0
        self._pending: asyncio.Future[bool] | None = None

    async def serving(self) -> bool:
        if self._verdict is not None and self._clock() - self._at < self._ttl_s:
            return self._verdict
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._ask())
        # shielded: a reader that goes away does not cancel the call the others wait on
        return await asyncio.shield(self._pending)

    async def _ask(self) -> bool:
        try:
            verdict = await self._check()
        finally:
            self._pending = None
        # a Gateway not serving is said (with its address, which /readyz no longer names); its
        # serving only once it had served before: the start-up's first serving verdict is asked
        # by a health probe at any time, perhaps beside a request, where every line must be the
        # request's (the log contract), and the stack says SERVING itself
        served = self._served
        self._served = self._served or verdict
        if verdict != self._verdict and (served or not verdict):
            if verdict:
                log.info("http-front: the Gateway at %s is serving", self._address)
            else:
                log.warning(
                    "http-front: the Gateway at %s is not serving: not ready", self._address
                )
        self._verdict, self._at = verdict, self._clock()
        return verdict
