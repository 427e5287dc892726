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

from services.semantic_cache.query import folded

ScopeKey = tuple[str, str]  # (tenant, scope)


class StoresInFlight:
    """Each Store in flight has an event of its own: a check waits for those open when it
    starts, never for Stores that begin while it waits (in a busy scope they overlap without
    end, and one shared event would hold every check for its whole timeout)."""

    def __init__(self) -> None:
        self._open: dict[ScopeKey, set[asyncio.Event]] = {}
        # Stores in flight, by question up to case and spacing (``query.folded``): the exact
        # match falls back to that key, so a Store of "how do i..." replaces what a lookup of
        # "How do I..." is served
        self._questions: dict[tuple[ScopeKey, str], int] = {}

    @contextlib.contextmanager
    def storing(self, key: ScopeKey, question: str = "") -> Iterator[None]:
        """Marks a Store of ``key``'s scope (of ``question``, normalised) in flight for the
        block's duration."""
        done = asyncio.Event()
        self._open.setdefault(key, set()).add(done)
        asked = (key, folded(question))
        self._questions[asked] = self._questions.get(asked, 0) + 1
        try:
            yield
        finally:
            events = self._open[key]
            events.discard(done)
            if not events:
                del self._open[key]
            left = self._questions[asked] - 1
            if left:
                self._questions[asked] = left
            else:
                del self._questions[asked]
            done.set()

    def busy(self, key: ScopeKey) -> bool:
        """A Store of the scope is in flight."""
        return key in self._open

    def storing_question(self, key: ScopeKey, question: str) -> bool:
        """A Store of this question of the scope, up to case and spacing (``query.folded``),
        is in flight: its answer may replace the one an exact match serves (a REFRESH, an
        answer of another tier, the same question in another casing)."""
        return (key, folded(question)) in self._questions

    async def settled(self, key: ScopeKey, timeout_s: float) -> None:
        """Waits up to ``timeout_s`` seconds for the scope's Stores in flight now to end
        (later ones are not waited for); past that the check goes on without them."""
        events = self._open.get(key)
        if not events:
            return
        waits = [asyncio.ensure_future(event.wait()) for event in events]
        try:
            await asyncio.wait(waits, timeout=timeout_s)
        finally:
            for wait in waits:
                wait.cancel()
