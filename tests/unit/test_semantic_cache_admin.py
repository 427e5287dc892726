"""What the router's Admin API asks of semantic-cache: per-tenant stats, each tenant's L1
policy (on/off, default TTL; durable in the data directory), drops by namespace."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from cachemesh.v1 import semantic_cache_pb2 as sc
from cachemesh.v1 import semantic_cache_pb2_grpc as sc_grpc
from services.common.clock import ManualClock
from services.semantic_cache import tenant_policy
from services.semantic_cache.api import L1_OFF, SemanticCacheApi
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.servicer import SemanticCacheService
from services.semantic_cache.tenant_policy import PolicyError, TenantPolicies
from services.semantic_cache.tenant_stats import STATS_PAGE_MAX, stats_page
from tests.unit.semantic_cache_support import FakeEmbedder, make_request
from tests.unit.test_semantic_cache_grpc import ANSWER, AUTH, expect, start

TTL_S = 3600.0


class Served:
    def __init__(self, stub: sc_grpc.SemanticCacheAsyncStub, clock: ManualClock) -> None:
        self.stub, self.clock = stub, clock

    async def store(self, tenant: str, question: str, namespace: str = "") -> sc.StoreResponse:
        request = make_request(question, namespace=namespace)
        reply: sc.StoreResponse = await self.stub.Store(
            sc.StoreRequest(tenant=tenant, request=request, answer=ANSWER), metadata=AUTH
        )
        return reply

    async def hit(self, tenant: str, question: str, namespace: str = "") -> bool:
        request = make_request(question, namespace=namespace)
        lookup = sc.LookupRequest(tenant=tenant, request=request)
        found: sc.LookupResponse = await self.stub.Lookup(lookup, metadata=AUTH)
        return found.hit

    async def set(self, **fields: Any) -> sc.L1Policy:
        policy: sc.L1Policy = await self.stub.SetPolicy(
            sc.SetL1PolicyRequest(**fields),
            metadata=AUTH,
        )
        return policy


async def _served(policies: TenantPolicies) -> AsyncIterator[Served]:
    clock = ManualClock()
    cache = SemanticCache(FakeEmbedder(), clock, threshold=0.8, ttl_s=TTL_S)
    server, port = await start(SemanticCacheService(SemanticCacheApi(cache, policies=policies)))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield Served(sc_grpc.SemanticCacheStub(channel), clock)
    await server.stop(None)


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    async for one in _served(TenantPolicies()):
        yield one


async def test_stats_count_each_tenants_entries_lookups_and_hits(served: Served) -> None:
    await served.store("a", "reset my password")
    await served.store("a", "close my account", namespace="billing")
    await served.store("b", "reset my password")
    assert await served.hit("a", "reset my password")  # exact
    assert not await served.hit("a", "what is the weather on mars")
    stats = await served.stub.Stats(sc.L1StatsRequest(), metadata=AUTH)
    rows = {row.tenant: row for row in stats.tenants}
    assert list(rows) == ["a", "b"]
    a = rows["a"]
    assert (a.entries, a.namespaces, a.stores) == (2, 2, 2)
    assert (a.lookups, a.hits, a.exact_hits, a.l1_enabled) == (2, 1, 1, True)
    assert (rows["b"].entries, rows["b"].lookups) == (1, 0)
    only_b = await served.stub.Stats(sc.L1StatsRequest(tenant="b"), metadata=AUTH)
    assert [row.tenant for row in only_b.tenants] == ["b"]


async def test_stats_come_a_page_of_tenants_at_a_time(served: Served) -> None:
    """The router's GetStats asks for one page of tenants (every tenant's rows in each reply
    passed gRPC's 4 MiB limit at ~57,000 tenants); a router older than pages still gets every
    tenant's rows in one reply."""
    for tenant in ("e", "c", "a"):
        await served.store(tenant, "reset my password")
    await served.set(tenant="b", l1_enabled=False)  # a policy alone
    assert not await served.hit("d", "reset my password")  # a lookup alone
    pages: list[list[str]] = []
    after, more = "", True
    while more:
        request = sc.L1StatsRequest(page_size=2, after=after)
        reply = await served.stub.Stats(request, metadata=AUTH)
        assert reply.paged
        pages.append([row.tenant for row in reply.tenants])
        after, more = reply.tenants[-1].tenant, reply.more
    assert pages == [["a", "b"], ["c", "d"], ["e"]]
    every = await served.stub.Stats(sc.L1StatsRequest(), metadata=AUTH)  # an older router's
    assert [row.tenant for row in every.tenants] == ["a", "b", "c", "d", "e"]
    assert not every.paged and not every.more
    one = sc.L1StatsRequest(tenant="b", page_size=1, after="z")  # the page is ignored
    (row,) = (await served.stub.Stats(one, metadata=AUTH)).tenants
    assert (row.tenant, row.l1_enabled) == ("b", False)
    bad = served.stub.Stats(sc.L1StatsRequest(page_size=-1), metadata=AUTH)
    assert (await expect(grpc.StatusCode.INVALID_ARGUMENT, bad)).startswith("page_size: ")


async def test_stats_of_one_tenant_say_whether_l1_knows_it_or_one_differing_in_case(
    served: Served,
) -> None:
    """What the router's Admin asks of a tenant without a key (it read every tenant's rows)."""
    await served.store("Acme", "reset my password")
    await served.set(tenant="acme", l1_enabled=False)  # a policy alone
    assert not await served.hit("globex", "reset my password")  # a lookup alone

    async def known(tenant: str) -> tuple[bool, str | None]:
        reply = await served.stub.Stats(sc.L1StatsRequest(tenant=tenant), metadata=AUTH)
        assert reply.HasField("known") and [row.tenant for row in reply.tenants] == [tenant]
        return reply.known, reply.known_as if reply.HasField("known_as") else None

    assert await known("Acme") == (True, None) == await known("acme") == await known("globex")
    assert await known("ACME") == (False, "Acme")  # the first by name of Acme and acme
    assert await known("GloBex") == (False, "globex")
    assert await known("initech") == (False, None)
    every = await served.stub.Stats(sc.L1StatsRequest(), metadata=AUTH)
    assert not every.HasField("known")


def test_a_stats_page_holds_1000_tenants_at_most_and_1_mib_of_names() -> None:
    tenants = [f"t{i:05d}" for i in range(2_500)]
    page, more = stats_page(reversed(tenants), "t00999", 5_000)
    assert (page, more) == (tenants[1000:2500], False)  # the caller caps the size
    page, more = stats_page(tenants, "", STATS_PAGE_MAX)
    assert (page, more) == (tenants[:1000], True)
    long = ["a" * 400_000, "b" * 400_000, "c" * 400_000, "d"]  # an older version's names
    assert stats_page(long, "", 10) == (long[:2], True)
    assert stats_page(["x" * 2_000_000, "y"], "", 10) == (["x" * 2_000_000], True)
    assert stats_page(long, "d", 10) == ([], False)


async def test_a_drop_of_one_namespace_keeps_the_others(served: Served) -> None:
    await served.store("a", "reset my password")  # the default namespace ""
    await served.store("a", "close my account", namespace="billing")
    default = sc.DropRequest(tenant="a", namespace="")
    assert (await served.stub.Drop(default, metadata=AUTH)).dropped == 1
    assert not await served.hit("a", "reset my password")
    assert await served.hit("a", "close my account", namespace="billing")
    every = sc.DropRequest(tenant="a")  # no namespace: every one of the tenant's
    assert (await served.stub.Drop(every, metadata=AUTH)).dropped == 1


async def test_l1_off_neither_serves_nor_stores_and_on_again_serves(served: Served) -> None:
    await served.store("a", "reset my password")
    policy = await served.set(tenant="a", l1_enabled=False)
    assert not policy.l1_enabled and policy.effective_default_ttl_s == TTL_S
    assert not await served.hit("a", "reset my password")
    refused = await served.store("a", "close my account")
    assert not refused.stored and refused.skip_reason == L1_OFF
    assert await served.hit("b", "reset my password") is False  # b never stored it
    await served.store("b", "reset my password")
    assert await served.hit("b", "reset my password")  # b's L1 is on
    lookup = sc.LookupRequest(tenant="a", request=make_request("x y"), want_embedding=True)
    skipped = await served.stub.Lookup(lookup, metadata=AUTH)
    assert skipped.skip_reason == L1_OFF and len(skipped.embedding) == 64 * 4  # the tier's input
    await served.set(tenant="a", l1_enabled=True)
    assert await served.hit("a", "reset my password")  # the entry was kept, not dropped
    rows = (await served.stub.Stats(sc.L1StatsRequest(tenant="a"), metadata=AUTH)).tenants
    assert rows[0].lookups == 1  # the lookups it skipped are not counted


async def test_l1_turned_off_during_a_model_call_stores_nothing_of_it(served: Served) -> None:
    """Lookup misses, the tenant's L1 goes off (and on again) while the model answers: the
    answer made meanwhile is not stored."""
    await served.store("a", "reset my password")  # the scope exists
    request = make_request("close my account")
    request.request_id = "req-7"
    lookup = sc.LookupRequest(tenant="a", request=request)
    assert not (await served.stub.Lookup(lookup, metadata=AUTH)).hit
    await served.set(tenant="a", l1_enabled=False)
    await served.set(tenant="a", l1_enabled=True)
    stored = await served.stub.Store(
        sc.StoreRequest(tenant="a", request=request, answer=ANSWER), metadata=AUTH
    )
    assert not stored.stored and "L1 turned off" in stored.skip_reason


async def test_a_tenants_default_ttl_applies_to_its_new_entries(served: Served) -> None:
    policy = await served.set(tenant="a", default_ttl_s=60.0)
    assert policy.HasField("default_ttl_s") and policy.effective_default_ttl_s == 60.0
    await served.store("a", "reset my password")
    await served.store("b", "reset my password")
    served.clock.advance(s=61.0)
    assert not await served.hit("a", "reset my password")  # a's 60 s
    assert await served.hit("b", "reset my password")  # b's SEMANTIC_CACHE_TTL_S
    reset = await served.set(tenant="a", reset_default_ttl=True)
    assert not reset.HasField("default_ttl_s") and reset.effective_default_ttl_s == TTL_S


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"tenant": "a", "default_ttl_s": 0.0}, "default_ttl_s"),
        ({"tenant": "a", "default_ttl_s": -5.0}, "default_ttl_s"),
        ({"tenant": "a", "default_ttl_s": 1e306}, "at most"),  # every Store would fail
        # taken: every entry expired as it was stored (whole milliseconds), never served
        ({"tenant": "a", "default_ttl_s": 5e-324}, "at least 1 s and at most 315360000 s"),
        ({"tenant": "a", "default_ttl_s": 0.5}, "at least 1 s"),
        ({"tenant": "a", "default_ttl_s": 5.0, "reset_default_ttl": True}, "not both"),
        ({"l1_enabled": False}, "tenant"),
    ],
)
async def test_a_bad_policy_change_names_the_field(
    served: Served, fields: dict[str, Any], field: str
) -> None:
    call = served.stub.SetPolicy(sc.SetL1PolicyRequest(**fields), metadata=AUTH)
    assert field in await expect(grpc.StatusCode.INVALID_ARGUMENT, call)


async def test_policies_survive_a_restart_in_the_data_directory(tmp_path: Path) -> None:
    path = tmp_path / "tenant-policies.json"
    async for served in _served(TenantPolicies(path)):
        await served.set(tenant="a", l1_enabled=False, default_ttl_s=120.0)
        await served.set(tenant="b", l1_enabled=False)
        await served.set(tenant="b", l1_enabled=True)  # back to the defaults: no line
    assert set(json.loads(path.read_text())["tenants"]) == {"a"}
    again = TenantPolicies(path)
    assert not again.get("a").l1_enabled and again.get("a").default_ttl_s == 120.0
    assert again.get("b").l1_enabled


@pytest.mark.parametrize(
    "doc",
    [
        '{"version": 1, "tenants": {"a": {"l1_enabled": "no"}}}',
        '{"version": 1, "tenants": ["a"]}',  # was a TypeError's traceback at start
        '{"version": 1, "tenants": "a"}',
        '{"version": 1, "tenants": null}',
    ],
)
def test_a_malformed_policy_file_is_refused_naming_it(tmp_path: Path, doc: str) -> None:
    path = tmp_path / "tenant-policies.json"
    path.write_text(doc)
    with pytest.raises(PolicyError, match=r"tenant-policies\.json"):
        TenantPolicies(path)


def test_a_newer_builds_policy_file_is_refused_saying_what_to_do(tmp_path: Path) -> None:
    """A rollback: the file of a later version is refused naming it as a newer build's (or an
    edited or damaged file: it has no checksum) and what to do (before: "expected {'version':
    1, ...}", as for a damaged file)."""
    path = tmp_path / "tenant-policies.json"
    path.write_text('{"version": 2, "tenants": {"a": {"l1_enabled": false}}}')
    with pytest.raises(PolicyError, match=r"version 2 is a newer build's, or edited or damaged"):
        TenantPolicies(path)


def test_a_refused_policy_file_names_the_tenants_with_l1_off_and_says_to_check_it(
    tmp_path: Path,
) -> None:
    """Its advice was to move the file aside, which turns L1 back on for the tenants who had it
    off: their kept entries served again (0 of the 2 named). It names those it can read as
    this build writes them (whatever else their policies hold), says a newer build may record
    L1 off otherwise, and the shape of a file of this build's version keeping them off."""
    path = tmp_path / "tenant-policies.json"
    doc = {
        "version": 2,
        "tenants": {
            "a": {"l1_enabled": False, "later": [1]},
            "b": {"l1_enabled": True},
            "c": {"l1_enabled": False, "default_ttl_s": "later"},
            "d": "later",
        },
    }
    path.write_text(json.dumps(doc))
    with pytest.raises(PolicyError) as refused:
        TenantPolicies(path)
    message = str(refused.value)
    assert "2 tenant(s) have \"l1_enabled\": false in it: 'a', 'c'." in message
    assert "before this build takes traffic" in message and "'b'" not in message
    assert "may record L1 off otherwise" in message and "check the file" in message
    path.write_text(json.dumps({"version": 1, "tenants": {"a": {"l1_enabled": False}}}))
    assert not TenantPolicies(path).get("a").l1_enabled  # the shape said loads as that


def test_a_refused_policy_files_line_is_bounded(tmp_path: Path) -> None:
    """A review's find: every tenant with L1 off was named and written again in full in a
    file's text (a 1 MB name: a 1,000,609-character line; 100,000 tenants: 5.2 M). At most 20
    are named now, each name cut as every message cuts one."""
    path = tmp_path / "tenant-policies.json"
    tenants = {f"t{i:05d}": {"l1_enabled": False} for i in range(30_000)}
    tenants["x" * 1_000_000] = {"l1_enabled": False}
    path.write_text(json.dumps({"version": 2, "tenants": tenants}))
    with pytest.raises(PolicyError) as refused:
        TenantPolicies(path)
    message = str(refused.value)
    assert "30001 tenant(s)" in message and "and 29981 more" in message
    assert len(message) < 4_000


def test_a_policy_file_nested_too_deep_is_refused_naming_it(tmp_path: Path) -> None:
    """A file nested past the recursion limit stopped the start with a RecursionError's
    traceback, not the PolicyError naming the file that any other unreadable file gets."""
    path = tmp_path / "tenant-policies.json"
    path.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(PolicyError, match="cannot read the tenant policies"):
        TenantPolicies(path)


@pytest.mark.parametrize(
    ("tenants", "said"),
    [
        ({"b": {}}, "may record L1 off otherwise"),
        (["a"], "'tenants' is not the object this build knows"),
    ],
)
def test_a_refused_policy_file_without_tenants_off_says_to_check_it(
    tmp_path: Path, tenants: Any, said: str
) -> None:
    path = tmp_path / "tenant-policies.json"
    path.write_text(json.dumps({"version": 3, "tenants": tenants}))
    with pytest.raises(PolicyError, match=said) as refused:
        TenantPolicies(path)
    assert "tenant(s) have" not in str(refused.value)


def test_a_ttl_below_a_second_an_older_version_kept_loads_as_one_second(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An older version took any default TTL > 0 (5e-324 s): its file still starts the
    service, with the least TTL now taken, and says so."""
    path = tmp_path / "tenant-policies.json"
    path.write_text(
        '{"version": 1, "tenants": {"a": {"l1_enabled": true, "default_ttl_s": 5e-324},'
        ' "b": {"l1_enabled": true, "default_ttl_s": 60}}}'
    )
    with caplog.at_level(logging.WARNING, "cachemesh.semantic_cache.policies"):
        policies = TenantPolicies(path)
    assert policies.get("a").default_ttl_s == 1.0 and policies.get("b").default_ttl_s == 60.0
    assert "below the 1 s" in caplog.text


async def test_a_policy_change_whose_caller_goes_during_its_write_is_followed_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SetPolicy cancelled (its deadline, its client gone) while the file is written in a
    worker thread, which cannot be stopped: the change the file then holds is the one the
    process follows, L1 off and the Stores on their way stopped. Before, the file said off
    while the process served and stored on, a restart turned it off, and the next change of
    any tenant wrote the file without it."""
    path = tmp_path / "policies.json"
    policies = TenantPolicies(path)
    api = SemanticCacheApi(
        SemanticCache(FakeEmbedder(), ManualClock(), threshold=0.8, ttl_s=TTL_S),
        policies=policies,
    )
    request = make_request("close my account")
    request.request_id = "req-8"
    looked_up = await api.lookup(sc.LookupRequest(tenant="a", request=request), None)
    assert not looked_up.hit  # its model call is on
    entered, go, written = threading.Event(), threading.Event(), threading.Event()
    real_write = tenant_policy._write

    def write(target: Path, held: dict[str, Any]) -> None:
        entered.set()
        assert go.wait(10)
        real_write(target, held)
        written.set()

    monkeypatch.setattr(tenant_policy, "_write", write)
    change = asyncio.ensure_future(
        api.set_policy(sc.SetL1PolicyRequest(tenant="a", l1_enabled=False))
    )
    assert await asyncio.to_thread(entered.wait, 10)
    change.cancel()
    with pytest.raises(asyncio.CancelledError):
        await change
    go.set()
    assert await asyncio.to_thread(written.wait, 10)
    async with policies._lock:  # the change has ended
        pass
    assert json.loads(path.read_text())["tenants"]["a"]["l1_enabled"] is False
    assert not (await api.get_policy(sc.L1PolicyRequest(tenant="a"))).l1_enabled
    await api.set_policy(sc.SetL1PolicyRequest(tenant="a", l1_enabled=True))
    stored = await api.store(sc.StoreRequest(tenant="a", request=request, answer=ANSWER))
    assert not stored.stored and "L1 turned off" in stored.skip_reason
    await api.set_policy(sc.SetL1PolicyRequest(tenant="b", default_ttl_s=600))
    assert TenantPolicies(path).get("a").l1_enabled  # on again, as last set
