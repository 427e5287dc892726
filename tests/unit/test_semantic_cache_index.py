"""A scope's index: exact, then rebuilt as IVF in the background when it grows."""

from __future__ import annotations

import threading

import faiss
import numpy as np
import pytest

from services.common.clock import ManualClock
from services.semantic_cache import index as index_module
from services.semantic_cache import rebuild
from services.semantic_cache.ann import train_ivf
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.embedder import l2_normalise
from services.semantic_cache.index import AnnSettings, ScopeIndex
from tests.unit.semantic_cache_support import FakeEmbedder
from tests.unit.test_semantic_cache_rules import answer, q

DIM = 32


def rows(n: int, seed: int = 0) -> np.ndarray:
    return l2_normalise(np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32))


def test_a_growing_scope_becomes_ivf_and_keeps_every_change_made_meanwhile() -> None:
    index = ScopeIndex(DIM, "", AnnSettings(min_entries=500, nprobe=64))
    data = rows(900)
    index.add_many(list(range(500)), data[:500], [f"q{i}" for i in range(500)])
    assert index.kind == "flat"  # the rebuild runs in the background
    for i in range(500, 900):  # changes while it may still be running
        index.add(i, data[i], f"q{i}")
    for i in range(0, 900, 3):
        index.remove(i, f"q{i}")
    index.wait_for_rebuild()
    assert index.kind == "ivf"
    kept = [i for i in range(900) if i % 3]
    assert index.ids == set(kept)
    for i in (1, 502, 898):
        assert index.search(data[i], 1)[0][0] == i
    assert all(index.search(data[i], 1)[0][0] != i for i in (0, 501, 897))  # removed
    ids, vectors = index.export()
    assert sorted(ids.tolist()) == kept
    assert np.allclose(vectors[ids.tolist().index(502)], data[502], atol=1e-6)
    index.remove(1, "q1")  # removal works on the IVF itself (no tombstones)
    assert 1 not in {v for v, _ in index.search(data[1], 5)}


def test_small_scopes_and_no_settings_stay_exact() -> None:
    index = ScopeIndex(DIM, "", None)
    index.add_many(list(range(100)), rows(100), [f"q{i}" for i in range(100)])
    index.wait_for_rebuild()
    assert index.kind == "flat"


async def _grown(count: int, cache: SemanticCache | None = None) -> SemanticCache:
    """A cache whose one scope holds ``count`` questions (IVF from 40 entries)."""
    if cache is None:
        ann = AnnSettings(min_entries=40)
        cache = SemanticCache(FakeEmbedder(dim=DIM), ManualClock(), threshold=0.8, ann=ann)
    for i in range(len(cache), count):
        await cache.store(q(f"question about topic {i} and thing {i * 7}"), answer())
    (scope,) = cache._scopes.values()
    scope.wait_for_rebuild()
    return cache


async def test_the_cache_serves_from_an_ivf_scope() -> None:
    cache = await _grown(60)
    (scope,) = cache._scopes.values()
    assert scope.kind == "ivf"
    assert (await cache.check(q("question about topic 12 and thing 84"))).hit
    assert len(cache.export_entries().entries) == 60


async def test_a_failed_rebuild_leaves_the_scope_serving_from_its_exact_index(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A build that fails (out of memory, say) is logged; lookups, stores and snapshots of
    the scope go on from its current index, and it is not retried on every add."""
    calls: list[int] = []

    def failing(rows: object, nlist: int, ann: AnnSettings) -> object:
        calls.append(nlist)
        raise MemoryError("no memory for the IVF")

    monkeypatch.setattr(rebuild, "train_ivf", failing)
    cache = await _grown(40)
    (scope,) = cache._scopes.values()
    assert scope.kind == "flat" and "IVF rebuild of a scope of 40 entries failed" in caplog.text
    assert (await cache.check(q("question about topic 12 and thing 84"))).hit
    await _grown(60, cache)  # not retried below GROWTH times the failed size
    assert len(calls) == 1
    assert len(cache.export_entries().entries) == 60


async def test_a_rebuild_that_cannot_start_leaves_every_store_made_and_served(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Taking the copy (the scope's vectors again) or starting the worker thread can fail
    too; the add that crossed the size is made by then. It failed the Store after its row was
    in the index: an id without its entry, every Lookup meeting it a KeyError and every
    snapshot refused (21 of 60 stores and lookups raised). Now it is a failed rebuild."""
    calls: list[int] = []

    def cannot_start(slices: list[object], ann: AnnSettings) -> object:
        calls.append(len(slices))
        raise MemoryError("no memory for the copy")

    monkeypatch.setattr(index_module, "Rebuild", cannot_start)
    cache = await _grown(60)
    (scope,) = cache._scopes.values()
    assert scope.kind == "flat" and len(scope) == len(cache) == 60
    assert "IVF rebuild of a scope of 40 entries failed" in caplog.text
    for i in (12, 39, 40, 59):
        assert (await cache.check(q(f"question about topic {i} and thing {i * 7}"))).hit
    assert len(cache.export_entries().entries) == 60
    assert len(calls) == 1  # not again below GROWTH times the failed size


def test_nlist_grows_with_the_square_root() -> None:
    ann = AnnSettings()
    assert [ann.nlist(n) for n in (20_000, 50_000, 1_000_000)] == [512, 1024, 4096]


def test_an_ivf_scope_is_retrained_with_more_lists_as_it_grows() -> None:
    index = ScopeIndex(DIM, "", AnnSettings(min_entries=200, nprobe=1024))
    data = rows(200 * 9, seed=3)
    index.add_many(list(range(200)), data[:200], [f"q{i}" for i in range(200)])
    index.wait_for_rebuild()
    first = index._index.nlist
    index.add_many(list(range(200, 1800)), data[200:], [f"q{i}" for i in range(200, 1800)])
    index.wait_for_rebuild()
    assert index.kind == "ivf" and index._index.nlist > first
    assert index.search(data[1700], 1)[0][0] == 1700 and len(index) == 1800


def test_trained_for_follows_the_rebuild_schedule() -> None:
    ann = AnnSettings()
    sizes = (10_000, 20_000, 159_999, 160_000, 1_000_000, 1_280_000)
    assert [ann.trained_for(n) for n in sizes] == [
        None,
        20_000,
        20_000,
        160_000,
        160_000,
        1_280_000,
    ]
    assert ann.nlist(160_000) == 2048  # what a scope grown to 1M holds (the bench measures it)
    assert AnnSettings(min_entries=0).trained_for(5) == 5


def test_a_scope_grown_past_growth_times_holds_the_lists_trained_for_says() -> None:
    ann = AnnSettings(min_entries=200, nprobe=1024)
    index = ScopeIndex(DIM, "", ann)
    data = rows(200 * 9, seed=5)
    for start in range(0, 1800, 200):  # grows in steps, as a live scope does
        index.add_many(
            list(range(start, start + 200)),
            data[start : start + 200],
            [f"q{i}" for i in range(start, start + 200)],
        )
        index.wait_for_rebuild()
    trained = ann.trained_for(1800)
    assert trained == 1600 and index._index.nlist == ann.nlist(trained)


@pytest.fixture
def held_training(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """IVF training in a rebuild waits until the returned event is set."""
    gate = threading.Event()

    def held(sample: np.ndarray, nlist: int, ann: AnnSettings) -> object:
        assert gate.wait(30)
        return train_ivf(sample, nlist, ann)

    monkeypatch.setattr(rebuild, "train_ivf", held)
    return gate


def test_a_scope_answers_during_and_after_a_retrain_that_replays_the_changes_made_meanwhile(
    held_training: threading.Event,
) -> None:
    gate = held_training
    index = ScopeIndex(DIM, "", AnnSettings(min_entries=300, nprobe=1024))
    data = rows(1400, seed=7)
    index.add_many(list(range(300)), data[:300], [f"q{i}" for i in range(300)])
    assert index.kind == "flat" and index._rebuild is not None  # crossed: the build waits
    for i in range(300, 1000):  # stores (one at a time) and removals during the build
        index.add(i, data[i], f"q{i}")
        if i % 5 == 0:
            index.remove(i - 250, f"q{i - 250}")
        assert index.search(data[i], 1)[0][0] == i  # answered meanwhile, by the exact index
    for start in range(1000, 1400, 100):  # and a few bulk adds: few changes, many rows
        vids = list(range(start, start + 100))
        index.add_many(vids, data[vids], [f"q{i}" for i in vids])
    gate.set()
    building = index._rebuild
    building.wait()
    # the worker replayed the changes itself, in batches: the swap is left fewer rows than
    # CATCH_UP (here none: nothing changed after it began replaying)
    left = building._changes[building._replayed :]
    assert sum(len(change.vids) for change in left) < rebuild.CATCH_UP
    index.wait_for_rebuild()
    removed = {i - 250 for i in range(300, 1000) if i % 5 == 0}
    assert index.kind == "ivf" and index.ids == set(range(1400)) - removed
    assert int(index.faiss_index.ntotal) == 1400 - len(removed)
    assert index.trained_for == 300  # the rows it was built from
    for i in range(1400):
        found = index.search(data[i], 1)[0][0]
        assert (found == i) == (i not in removed)


def test_a_rebuild_hands_over_only_once_few_rows_are_left_to_replay(
    held_training: threading.Event,
) -> None:
    gate = held_training
    index = ScopeIndex(DIM, "", AnnSettings(min_entries=300, nprobe=1024))
    data = rows(1100, seed=9)
    index.add_many(list(range(300)), data[:300], [f"q{i}" for i in range(300)])
    for start in range(300, 1100, 200):  # four changes, 800 rows
        vids = list(range(start, start + 200))
        index.add_many(vids, data[vids], [f"q{i}" for i in vids])
    building = index._rebuild
    assert building is not None
    gate.set()
    building.wait()
    assert building._replayed == 4  # replayed by the worker, not left to the lookup path
    index.wait_for_rebuild()
    assert index.kind == "ivf" and int(index.faiss_index.ntotal) == 1100
    assert all(index.search(data[i], 1)[0][0] == i for i in range(0, 1100, 7))


def test_a_build_uses_the_configured_faiss_threads_in_its_own_thread() -> None:
    seen: list[int] = []

    def build() -> None:
        train_ivf(rows(200), 16, AnnSettings(threads=1))
        seen.append(faiss.omp_get_max_threads())

    worker = threading.Thread(target=build)
    worker.start()
    worker.join()
    assert seen == [1]


def test_a_sized_scope_is_the_index_a_rebuild_of_the_same_rows_makes() -> None:
    ann = AnnSettings(min_entries=500, nprobe=8)
    data = rows(2000, seed=11)
    grown = ScopeIndex(DIM, "", ann)
    grown.add_many(list(range(2000)), data, [f"q{i}" for i in range(2000)])
    grown.wait_for_rebuild()
    asked: list[np.ndarray] = []

    def sample(positions: np.ndarray) -> np.ndarray:
        asked.append(positions)
        chosen: np.ndarray = data[positions]
        return chosen

    sized = ScopeIndex.sized(DIM, "", ann, 2000, sample)
    assert sized.kind == "ivf" and sized._rebuild is None and len(sized) == 0
    for start in range(0, 2000, 300):  # streamed in slices, as a restore does
        vids = list(range(start, min(start + 300, 2000)))
        sized.add_many(vids, data[vids], [f"q{i}" for i in vids])
    assert sized._rebuild is None and sized.faiss_index.nlist == grown.faiss_index.nlist
    assert len(asked) == 1 and len(asked[0]) == min(2000, 40 * ann.nlist(2000))
    probes = l2_normalise(data[:200] + 0.05 * rows(200, seed=12))
    for row in probes:
        assert sized.search(row, 5) == grown.search(row, 5)
    small = ScopeIndex.sized(DIM, "", ann, 499, sample)
    assert small.kind == "flat" and len(asked) == 1  # below min_entries: exact, no sample


async def test_a_finished_rebuild_is_swapped_in_while_its_scope_is_idle(
    held_training: threading.Event,
) -> None:
    """A scope holds its old index and the new one until the rebuild is swapped in; that
    waited for the scope's own next add, removal or search, so an idle scope held its
    vectors twice (6.1 MB for 3.1 after 400 requests of another tenant). Another scope's
    Lookup or Store swaps it in now."""
    cache = SemanticCache(
        FakeEmbedder(dim=DIM), ManualClock(), threshold=0.8, ann=AnnSettings(min_entries=40)
    )
    for i in range(40):
        await cache.store(q(f"question about topic {i} and thing {i * 7}"), answer())
    (scope,) = cache._scopes.values()
    building = scope._rebuild
    assert building is not None and scope.kind == "flat"
    held_training.set()
    building.wait()
    assert scope._rebuild is not None  # done, not swapped in: nothing of the scope ran since
    assert not (await cache.check(q("what is the refund policy", "b"))).hit
    assert scope.kind == "ivf" and scope._rebuild is None
    assert cache._rebuilding == []
    hit = await cache.check(q("question about topic 12 and thing 84"))
    assert hit.hit


@pytest.mark.parametrize("way", ["purged", "its_entries_dropped", "expired"])
async def test_a_dropped_scope_is_not_kept_for_its_rebuild(
    held_training: threading.Event, way: str
) -> None:
    """A scope that goes while its rebuild runs (its tenant's purge, its last entry dropped,
    its entries expired) leaves the rebuilds to swap in: kept there, the scope's vectors (its
    old index and the rebuild's) stayed in memory until the build ended and another scope's
    Lookup swapped it in."""
    clock = ManualClock()
    cache = SemanticCache(
        FakeEmbedder(dim=DIM), clock, threshold=0.8, ttl_s=60.0, ann=AnnSettings(min_entries=40)
    )
    ids = [
        (await cache.store(q(f"question about topic {i} and thing {i * 7}"), answer())).entry_id
        for i in range(40)
    ]
    (scope,) = cache._scopes.values()
    building = scope._rebuild
    assert building is not None and cache._rebuilding == [scope]
    if way == "purged":
        assert await cache.drop("a") == 40
    elif way == "its_entries_dropped":
        assert [await cache.drop_entry("a", entry_id) for entry_id in ids] == [1] * 40
    else:
        clock.advance(s=61)
        assert not (await cache.check(q("what is the refund policy", "b"))).hit
    assert cache._scopes == {} and cache._rebuilding == []
    held_training.set()
    building.wait()
    assert not (await cache.check(q("question about topic 12 and thing 84"))).hit
