"""After an upgrade that changes the scope's rule (``SCOPE_VERSION``), the entries stored under
the old one are held (counted in ``l1_entries`` and the entries gauge, using capacity) but no
lookup can reach them: before the stamp nothing said how many. Each entry now carries the scope
version it was stored under; a restart says how many of those restored are of an older one, and
``cachemesh_semantic_cache_old_scope_entries`` counts them while they are held.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import semantic_cache_pb2 as sc
from services.common.clock import ManualClock
from services.semantic_cache import cache as cache_module
from services.semantic_cache import query as query_module
from services.semantic_cache.api import SemanticCacheApi
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.metrics import StoreCollector
from services.semantic_cache.persistence import SnapshotStore, entry_from_json, entry_json
from services.semantic_cache.records import UNSTAMPED_SCOPE
from services.semantic_cache.snapshotter import Snapshotter
from services.semantic_cache.stats import StoreStats
from services.semantic_cache.wal import WriteAheadLog
from tests.unit.semantic_cache_support import FakeEmbedder, make_request

QUESTIONS = (
    "what are your opening hours",
    "how do i reset my password",
    "where is my parcel",
    "can i pay by card",
    "do you ship abroad",
)
NEXT = "cachemesh.semantic.scope.v-next"
OLD_SCOPE = "cachemesh_semantic_cache_old_scope_entries"
TTL_S = 30 * 86_400  # past the longest default TTL


class Shard:
    """A semantic-cache on a data directory, as a build of ``version`` runs it."""

    def __init__(self, directory: Path, clock: ManualClock, version: str) -> None:
        self.stats = StoreStats(scope_version=version)
        self.cache = SemanticCache(FakeEmbedder(), clock, threshold=0.8, stats=self.stats)
        self.snapshots = Snapshotter(SnapshotStore(directory), clock, 0, WriteAheadLog(directory))
        self.api = SemanticCacheApi(self.cache)
        self.registry = CollectorRegistry()
        self.registry.register(StoreCollector(self.stats, 10))

    async def store(self, question: str) -> None:
        answer = sc.CachedAnswer(content=[pb.ContentBlock(text="yes")], stop_reason="end_turn")
        request = sc.StoreRequest(tenant="acme", request=make_request(question), answer=answer)
        assert (await self.api.store(request)).stored

    async def hits(self) -> int:
        found = 0
        for question in QUESTIONS:
            lookup = sc.LookupRequest(tenant="acme", request=make_request(question))
            found += (await self.api.lookup(lookup, None)).hit
        return found

    def l1_entries(self) -> int:
        (row,) = self.api.stats(sc.L1StatsRequest(tenant="acme")).tenants
        return row.entries

    def old_scope(self) -> float | None:
        return self.registry.get_sample_value(OLD_SCOPE)


async def test_entries_of_an_older_scope_version_are_counted_and_said_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock()
    old = Shard(tmp_path, clock, query_module.SCOPE_VERSION)
    await old.snapshots.open(old.cache)
    for question in QUESTIONS:
        await old.store(question)
    assert (await old.hits(), old.l1_entries(), old.old_scope()) == (5, 5, 0)
    await old.snapshots.stop()

    # the next build changes the scope's rule
    monkeypatch.setattr(query_module, "SCOPE_VERSION", NEXT)
    monkeypatch.setattr(cache_module, "SCOPE_VERSION", NEXT)
    caplog.set_level(logging.INFO, "cachemesh.semantic_cache.persistence")
    new = Shard(tmp_path, clock, NEXT)
    await new.snapshots.open(new.cache)
    # held and counted, never served: 5 of 5 unreachable, and now the figure says so
    assert (await new.hits(), new.l1_entries(), new.old_scope()) == (0, 5, 5)
    said = [r.getMessage() for r in caplog.records if "older scope version" in r.getMessage()]
    assert said and said[0].startswith("5 of the 5 entries restored are of an older scope")
    await new.store(QUESTIONS[0])  # answered again: a new entry, the old one left to age out
    assert (await new.hits(), new.l1_entries(), new.old_scope()) == (1, 6, 5)
    clock.advance(s=TTL_S + 1)  # past every entry's TTL: the next lookup removes them
    assert await new.hits() == 0
    assert (sum(new.stats.entries.values()), new.old_scope()) == (0, 0)
    await new.snapshots.stop()


def test_an_entry_keeps_its_scope_version_on_disk_and_an_unstamped_one_is_v3s() -> None:
    """An entry written before entries carried their scope version was stored under v3 (the
    version when they began to): after the next bump it counts as an old one too."""
    assert UNSTAMPED_SCOPE == "cachemesh.semantic.scope.v3" == query_module.SCOPE_VERSION
    entry = entry_from_json(
        {
            "entry_id": "e1",
            "tenant": "acme",
            "scope": "s",
            "namespace": "",
            "query": "q",
            "created_at_ms": 1,
            "expires_at_ms": 2,
            "embedder_version": "fake@1",
            "payload": "",
            "stop_reason": "end_turn",
            "output_tokens": 1,
            "has_tool_use": False,
        }
    )
    assert entry.scope_version == UNSTAMPED_SCOPE
    stamped = entry_json(entry) | {"scope_version": NEXT}
    assert entry_from_json(stamped).scope_version == NEXT
