"""Two entries of one question up to case and spacing (their folded key, ``query.folded``, is
one): whichever of them goes, by a drop, its TTL or an eviction, the folded key points at the
one left, so a third way of writing the question is still an exact hit (before, removing the
later one took the shared key with it, and the older one was found by search only)."""

from __future__ import annotations

import numpy as np

from services.common.clock import ManualClock
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.embedder import l2_normalise
from services.semantic_cache.index import ScopeIndex, folded_key
from tests.unit.semantic_cache_support import FakeEmbedder
from tests.unit.test_semantic_cache_rules import answer, q

OLDER = "How do I reset my password?"
LATER = "how do I reset my  password?"
ASKED = "how do I  reset my password?"  # a third writing: neither one's own exact key

DIM = 8


def _rows(n: int) -> np.ndarray:
    return l2_normalise(np.random.default_rng(0).standard_normal((n, DIM)).astype(np.float32))


def test_the_folded_key_goes_back_to_the_variant_left() -> None:
    index = ScopeIndex(DIM, "", None)
    data = _rows(3)
    index.add_many([1, 2, 3], data, ["Ab c", "ab  c", "AB C"])
    digest = folded_key("ab c")
    assert index.folded[digest] == 3
    index.remove(3, "AB C")  # the newest: the one before it
    assert index.folded[digest] == 2
    index.remove(1, "Ab c")  # an older one: the key stays where it is
    assert index.folded[digest] == 2
    index.remove(2, "ab  c")  # the last: no key
    assert digest not in index.folded
    index.add_many([4, 5], data[:2], ["ab c", "AB c"])
    index.remove_many([5, 4], ["AB c", "ab c"])  # both at once
    assert digest not in index.folded and not index.ids


def _cache(max_entries: int = 100) -> tuple[SemanticCache, ManualClock]:
    clock = ManualClock()
    return SemanticCache(
        FakeEmbedder(), clock, threshold=0.8, ttl_s=3600.0, max_entries=max_entries
    ), clock


async def _both(
    cache: SemanticCache, clock: ManualClock, later_ttl_s: float | None = None
) -> tuple[str, str]:
    older = await cache.store(q(OLDER), answer(b"older"))
    clock.advance(s=1)
    later = await cache.store(q(LATER), answer(b"later"), default_ttl_s=later_ttl_s)
    assert older.stored and later.stored
    hit = await cache.check(q(ASKED))
    assert hit.exact and hit.entry is not None and hit.entry.entry_id == later.entry_id
    return older.entry_id, later.entry_id


async def _older_is_an_exact_hit(cache: SemanticCache, older: str) -> None:
    for asked in (ASKED, LATER):
        result = await cache.check(q(asked))
        assert result.hit and result.entry is not None and result.entry.entry_id == older
        assert result.exact, f"{asked!r}: the older variant found by search only"


async def test_dropping_the_later_variant_leaves_the_older_an_exact_hit() -> None:
    cache, clock = _cache()
    older, later = await _both(cache, clock)
    assert await cache.drop_entry("a", later) == 1
    await _older_is_an_exact_hit(cache, older)


async def test_the_later_variant_expiring_first_leaves_the_older_an_exact_hit() -> None:
    cache, clock = _cache()
    # the tenant's default TTL (Admin SetPolicy) gives the later one a shorter expiry
    older, _ = await _both(cache, clock, later_ttl_s=60.0)
    clock.advance(s=61)
    await _older_is_an_exact_hit(cache, older)


async def test_the_later_variant_evicted_leaves_the_older_an_exact_hit() -> None:
    cache, clock = _cache(max_entries=2)
    older, later = await _both(cache, clock)
    touched = await cache.check(q(OLDER))  # its own key: now the most recently used
    assert touched.exact and touched.entry is not None and touched.entry.entry_id == older
    clock.advance(s=1)
    assert (await cache.store(q("What is the capital of France?"), answer())).stored
    assert later not in {e.entry_id for e in cache.export_entries().entries}  # evicted
    await _older_is_an_exact_hit(cache, older)


async def test_a_restored_cache_keeps_both_variants_under_the_folded_key() -> None:
    """A restart reads the entries back (``restore``), most recently used last: the later one
    dropped there, the older one is still the folded key's."""
    cache, clock = _cache()
    older, later = await _both(cache, clock)
    restored = SemanticCache(FakeEmbedder(), clock, threshold=0.8, ttl_s=3600.0)
    restored.restore(cache.export_entries())
    assert await restored.drop_entry("a", later) == 1
    await _older_is_an_exact_hit(restored, older)
