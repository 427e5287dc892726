"""Stores received and not yet applied, per scope: a check of that scope waits for them.

The router does not wait for an answer's Store before it replies (the Store's embedding was
half of a miss's latency). A request that follows its answer — the same question again, or a
paraphrase in the same conversation scope — reaches this process after that Store did, so a
check first waits, briefly, for the scope's Stores in flight: what the router sent before a
lookup is seen by it. Stores of other scopes never delay a check.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

ScopeKey = tuple[str, str]  # (tenant, scope)


class StoresInFlight:
    def __init__(self) -> None:
        self._open: dict[ScopeKey, tuple[int, asyncio.Event]] = {}

    @contextlib.contextmanager
    def storing(self, key: ScopeKey) -> Iterator[None]:
        """Marks a Store of ``key``'s scope in flight for the block's duration."""
        count, done = self._open.get(key, (0, asyncio.Event()))
        self._open[key] = (count + 1, done)
        try:
            yield
        finally:
            count, done = self._open[key]
            if count == 1:
                del self._open[key]
                done.set()
            else:
                self._open[key] = (count - 1, done)

    async def settled(self, key: ScopeKey, timeout_s: float) -> None:
        """Waits up to ``timeout_s`` seconds for the scope's Stores in flight now to end
        (later ones are not waited for); past that the check goes on without them."""
        entry = self._open.get(key)
        if entry is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(entry[1].wait(), timeout_s)
