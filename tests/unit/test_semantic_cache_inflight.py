"""A check waits for its scope's Stores in flight at its start, and only for those."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable

from services.common.clock import ManualClock
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.embedder import Vectors
from services.semantic_cache.inflight import StoresInFlight
from services.semantic_cache.records import Entry
from tests.unit.semantic_cache_support import FakeEmbedder
from tests.unit.test_semantic_cache_persistence import q
from tests.unit.test_semantic_cache_rules import answer

KEY = ("acme", "scope-1")


async def _turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_a_check_is_not_held_by_stores_that_began_after_it() -> None:
    # in a busy scope Stores overlap without end: the check waits for the one open at its
    # start, not for every later one (one shared event held it for its whole timeout)
    inflight = StoresInFlight()
    with contextlib.ExitStack() as first:
        first.enter_context(inflight.storing(KEY))
        check = asyncio.create_task(inflight.settled(KEY, timeout_s=3600))
        await _turns()
        with inflight.storing(KEY):  # begins while the check waits
            await _turns()
            assert not check.done()
            first.close()  # the Store open at the check's start ends
            await _turns()
            assert check.done()
    await check


async def test_a_check_waits_for_every_store_open_at_its_start() -> None:
    inflight = StoresInFlight()
    with contextlib.ExitStack() as a, contextlib.ExitStack() as b:
        a.enter_context(inflight.storing(KEY))
        b.enter_context(inflight.storing(KEY))
        check = asyncio.create_task(inflight.settled(KEY, timeout_s=3600))
        await _turns()
        a.close()
        await _turns()
        assert not check.done()
        b.close()
        await _turns()
        assert check.done()


async def test_other_scopes_and_an_idle_scope_never_delay_a_check() -> None:
    inflight = StoresInFlight()
    with inflight.storing(("acme", "other")), inflight.storing(("globex", "scope-1")):
        check = asyncio.create_task(inflight.settled(KEY, timeout_s=3600))
        await _turns(1)
        assert check.done()


async def test_a_check_gives_up_after_its_timeout_and_the_store_still_ends_cleanly() -> None:
    inflight = StoresInFlight()
    with inflight.storing(KEY):
        await inflight.settled(KEY, timeout_s=0)
    assert not inflight._open  # nothing left behind for the scope


class _GatedEmbedder(FakeEmbedder):
    """Embeds the texts in ``held`` only once ``gate`` is set (a Store kept in flight)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.held: set[str] = set()

    def embed(self, texts: list[str]) -> Vectors:
        if self.held.intersection(texts):
            assert self.gate.wait(10), "the test never opened the gate"
        return super().embed(texts)


async def test_an_exact_hit_is_not_held_by_stores_of_other_questions_of_its_scope() -> None:
    """A single-scope tenant (one system prompt) has Stores in flight nearly always under load:
    its exact hits waited for them all (a real process, 8 writers: p50 0.7 ms alone, 39-49 ms
    with them). An exact hit needs nothing a Store may add: it is served at once, unless the
    Store in flight is of that very question (its new answer replaces the stored one, a
    REFRESH's: that lookup waits and gets it). A lookup that would miss still waits."""
    embedder = _GatedEmbedder()
    cache = SemanticCache(embedder, ManualClock(), threshold=0.8, ttl_s=3_600.0)
    stored, pending = "how do i reset my password", "where can i download my invoices"
    assert (await cache.store(q(stored), answer(b"old"))).stored
    embedder.held = {pending}
    other = asyncio.create_task(cache.store(q(pending), answer(b"invoices")))
    await _turns()
    try:
        hit = await asyncio.wait_for(cache.check(q(stored)), timeout=0.5)  # before: 1 s
        assert hit.exact and hit.entry is not None and hit.entry.answer.payload == b"old"
        assert not other.done()  # served while the other question's Store is in flight
    finally:
        embedder.gate.set()
    assert (await other).stored
    journal = _GatedJournal()  # the same question's second Store: embedded already, it waits
    cache.attach_journal(journal)  # for its log record to be durable instead
    refresh = asyncio.create_task(cache.store(q(stored), answer(b"newest")))
    await _turns()
    waiting = asyncio.create_task(cache.check(q(stored)))
    await _turns()
    assert not refresh.done() and not waiting.done()  # it waits for that Store
    journal.gate.set()
    assert (await refresh).stored
    served = await waiting
    assert served.entry is not None and served.entry.answer.payload == b"newest"


class _GatedJournal:
    """A write-ahead log whose records are durable (applied) once ``gate`` is set."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self._applies: list[Callable[[], None]] = []

    def log_store(self, entry: Entry, vector: Vectors, apply: Callable[[], None]) -> None:
        self._applies.append(apply)

    def log_drop(self, tenant: str, namespace: str | None, apply: Callable[[], None]) -> None:
        self._applies.append(apply)

    def log_drop_entry(
        self, tenant: str, entry_id: str, apply: Callable[[], None], reason: str = ""
    ) -> None:
        self._applies.append(apply)

    async def sync(self) -> None:
        await self.gate.wait()
        applies, self._applies = self._applies, []
        for apply in applies:
            apply()


async def test_an_exact_hit_waits_for_a_store_of_its_question_in_another_casing() -> None:
    """The exact match falls back to the question up to case and spacing, the last one so
    stored: a Store of "how do i reset..." in flight replaces what "how do I reset..." is
    served. The early exact path keyed the Stores in flight by the exact text, so that lookup
    was served the OLD answer while the variant's Store was on (a real process: 40 of 40;
    before the early path, 1 of 40). Now it waits for that Store and gets its answer."""
    embedder = _GatedEmbedder()
    cache = SemanticCache(embedder, ManualClock(), threshold=0.8, ttl_s=3_600.0)
    base = "How do I reset the password of account 7 on the portal"
    assert (await cache.store(q(base), answer(b"old"))).stored
    variant = base.lower()
    embedder.held = {variant}
    store = asyncio.create_task(cache.store(q(variant), answer(b"new")))
    await _turns()
    look = asyncio.create_task(cache.check(q(base.replace("How do I", "how do I"))))
    await _turns()
    served_early = look.done()
    embedder.gate.set()
    assert (await store).stored
    served = await look
    assert served.entry is not None
    assert (served_early, served.entry.answer.payload) == (False, b"new")
