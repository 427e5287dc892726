"""The router's Admin servicer on loopback: its credential, its refusals, what it asks of
semantic-cache (a real servicer on a fake embedder) and prefix-cache (its Totals, faked here:
the unit under test is the Admin API)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from cachemesh.admin import revoke_request, rotate_request
from cachemesh.admin_cli import as_json
from cachemesh.cli import main
from cachemesh.envfile import read_env_file
from cachemesh.v1 import admin_pb2 as adm
from cachemesh.v1 import admin_pb2_grpc, prefix_cache_pb2_grpc, semantic_cache_pb2_grpc
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import prefix_cache_pb2 as pc
from cachemesh.v1 import semantic_cache_pb2 as sc
from services.common.auth import InternalAuthInterceptor, internal_metadata
from services.common.clock import ManualClock
from services.common.env import ConfigError, Env
from services.common.key_store import KeyStore
from services.common.keyfile import hash_key, new_api_key
from services.common.metrics import TenantLabels
from services.common.model_overrides import model_table_from_env
from services.router import admin_pages
from services.router.admin import AdminServicer
from services.router.admin_auth import (
    AUTH_FAILED_LOG_EVERY_MS,
    AdminCredential,
    AuthFailures,
    admin_credential_from_env,
)
from services.router.admin_pages import token
from services.router.limit_policy import NANOS_PER_DOLLAR, LimitPolicy
from services.router.metrics import RouterMetrics
from services.router.settings import RouterSettings
from services.router.tenant_limits import PerTenantPolicies, TenantLimitStore
from services.semantic_cache.api import SemanticCacheApi
from services.semantic_cache.cache import SemanticCache
from services.semantic_cache.query import query_from_request
from services.semantic_cache.records import Answer
from services.semantic_cache.servicer import SemanticCacheService
from services.semantic_cache.tenant_policy import TenantPolicies
from tests.unit.semantic_cache_support import FakeEmbedder

ROOT = Path(__file__).resolve().parents[2]
ADMIN_TOKEN = "admin-token-for-the-unit-tests-0123"
INTERNAL = "internal-token-0123456789abcdef"
ADMIN = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
Context = grpc.aio.ServicerContext[Any, Any]
# the router's own limits (ROUTER_LIMIT_*, ROUTER_BUDGET_*) in the rig
LIMIT_DEFAULTS = LimitPolicy(requests_per_min=600, day_budget_nanos=50 * NANOS_PER_DOLLAR)


class Totals(prefix_cache_pb2_grpc.PrefixCacheServicer):
    async def Plan(self, request: pc.PlanRequest, context: Context) -> pc.PlanResponse:
        raise NotImplementedError  # the Admin API never plans

    async def Commit(self, request: pc.CommitRequest, context: Context) -> pc.CommitResponse:
        raise NotImplementedError  # nor commits

    in_flight = 0
    peak = 0
    asked: ClassVar[list[str]] = []  # the tenants asked for
    calls: ClassVar[list[str]] = []  # "Totals" or "TotalsBatch", a call each
    hang = False  # no answer: each call waits out its timeout
    batch = True  # False: a prefix-cache older than TotalsBatch (UNIMPLEMENTED)
    failing: ClassVar[set[str]] = set()  # a batch asking for one of these fails UNAVAILABLE

    async def Totals(self, request: pc.TotalsRequest, context: Context) -> pc.TotalsResponse:
        Totals.asked.append(request.tenant)
        Totals.calls.append("Totals")
        Totals.in_flight += 1
        Totals.peak = max(Totals.peak, Totals.in_flight)
        try:
            await asyncio.sleep(3600 if Totals.hang else 0.005)
        finally:
            Totals.in_flight -= 1
        return billed()

    async def TotalsBatch(
        self, request: pc.TotalsBatchRequest, context: Context
    ) -> pc.TotalsBatchResponse:
        if not Totals.batch:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        Totals.asked.extend(request.tenants)
        Totals.calls.append("TotalsBatch")
        if Totals.failing.intersection(request.tenants):
            await context.abort(grpc.StatusCode.UNAVAILABLE, "prefix-cache's Redis is down")
        await asyncio.sleep(3600 if Totals.hang else 0.005)
        return pc.TotalsBatchResponse(
            tenants=[pc.TenantTotals(tenant=t, totals=billed()) for t in request.tenants]
        )


def billed() -> pc.TotalsResponse:
    return pc.TotalsResponse(
        requests=3,
        usage=pb.Usage(input_tokens=30, output_tokens=12),
        cost_nanos=100,
        baseline_nanos=250,
    )


@pytest.fixture(autouse=True)
def _fresh_totals() -> Iterator[None]:
    Totals.asked.clear()
    Totals.calls.clear()
    Totals.failing.clear()
    Totals.peak = 0
    yield
    Totals.hang, Totals.batch = False, True


@dataclass
class Rig:
    stub: admin_pb2_grpc.AdminAsyncStub
    keys: KeyStore
    key_file: Path
    demo_key: str
    cache: SemanticCache
    limits: PerTenantPolicies
    refused: list[str]  # the reasons of the calls refused for their credential, in order
    now: list[float]  # the auth failures' clock, in seconds: [0] is now
    target: str  # the router's address


async def _rig(
    tmp_path: Path,
    credential: AdminCredential | None,
    semantic_up: bool = True,
    router_internal: str = INTERNAL,
    timeout_s: float = 5.0,
    l1_policies: TenantPolicies | None = None,
    l1_service: type[SemanticCacheService] = SemanticCacheService,
    wall: Callable[[], float] = time.time,
) -> AsyncIterator[Rig]:
    """``l1_policies``: semantic-cache's tenant policies (None: none); ``l1_service``: its
    servicer (an older one, without pages); ``wall``: the key store's clock."""
    demo_key = new_api_key()
    key_file = tmp_path / "api-keys"
    key_file.write_text(f"acme:{hash_key(demo_key)}\n")
    # re-reads on the caller's thread: these tests edit the files by hand and ask at once (the
    # worker thread a store re-reads in is test_key_store.py's and test_tenant_limits.py's)
    keys = KeyStore.open(key_file, time.monotonic, wall, 0.0, start=lambda job: job())
    limits = PerTenantPolicies(
        LIMIT_DEFAULTS,
        TenantLimitStore(
            tmp_path / "tenant-limits", time.monotonic, time.time, 0, start=lambda job: job()
        ),
    )
    internal = grpc.aio.server(interceptors=[InternalAuthInterceptor(INTERNAL)])
    cache = SemanticCache(FakeEmbedder(), ManualClock(), threshold=0.8)
    if semantic_up:
        semantic_cache_pb2_grpc.add_SemanticCacheServicer_to_server(
            l1_service(SemanticCacheApi(cache, policies=l1_policies)), internal
        )
    prefix_cache_pb2_grpc.add_PrefixCacheServicer_to_server(Totals(), internal)
    port = internal.add_insecure_port("127.0.0.1:0")
    await internal.start()
    router = grpc.aio.server()
    refused: list[str] = []
    now = [0.0]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        admin = AdminServicer(
            credential,
            keys,
            semantic_cache_pb2_grpc.SemanticCacheStub(channel),
            prefix_cache_pb2_grpc.PrefixCacheStub(channel),
            internal_metadata(router_internal),
            timeout_s,
            auth_failures=AuthFailures(lambda: now[0], refused.append),
            limits=limits,
        )
        admin_pb2_grpc.add_AdminServicer_to_server(admin, router)
        router_port = router.add_insecure_port("127.0.0.1:0")
        await router.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{router_port}") as front:
            stub = admin_pb2_grpc.AdminStub(front)
            target = f"127.0.0.1:{router_port}"
            yield Rig(stub, keys, key_file, demo_key, cache, limits, refused, now, target)
        await router.stop(None)
    await internal.stop(None)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    async for one in _rig(tmp_path, AdminCredential(ADMIN_TOKEN)):
        yield one


async def expect(code: grpc.StatusCode, call: Awaitable[object]) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    return caught.value.details() or ""


async def test_only_the_admin_token_is_accepted(rig: Rig) -> None:
    unauthenticated = grpc.StatusCode.UNAUTHENTICATED
    presented = (rig.demo_key, ADMIN_TOKEN + "x", ADMIN_TOKEN[:-1])
    wrong = [(("authorization", f"Bearer {token}"),) for token in presented]
    for metadata in ((), *wrong):
        details = await expect(
            unauthenticated, rig.stub.ListKeys(adm.ListKeysRequest(), metadata=metadata)
        )
        assert "admin token" in details and rig.demo_key not in details
    listed = await rig.stub.ListKeys(adm.ListKeysRequest(), metadata=ADMIN)
    assert [k.tenant for k in listed.keys] == ["acme"]


def _no_piece_of(tokens: tuple[str, ...], text: str) -> bool:
    """No 6 characters in a row of any of ``tokens`` are in ``text``."""
    return not any(t[i : i + 6] in text for t in tokens for i in range(len(t) - 5))


async def test_a_refused_credential_is_counted_and_logged_without_the_token(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """A failed Admin login was neither logged nor counted: an operator could not see a
    brute force. Each is counted by reason; a WARNING line names the method and the caller's
    address (never the token), at most one every AUTH_FAILED_LOG_EVERY_MS a reason."""
    caplog.set_level(logging.WARNING, logger="cachemesh.admin")
    wrong = ADMIN_TOKEN[:-1] + "X"
    twice = (("authorization", f"Bearer {ADMIN_TOKEN}"), ("authorization", f"Bearer {wrong}"))
    unauthenticated = grpc.StatusCode.UNAUTHENTICATED
    await expect(unauthenticated, rig.stub.ListKeys(adm.ListKeysRequest()))
    bearer = (("authorization", f"Bearer {wrong}"),)
    await expect(unauthenticated, rig.stub.RotateKey(adm.RotateKeyRequest(id="k"), metadata=bearer))
    demo = (("authorization", f"Bearer {rig.demo_key}"),)  # an API key: as wrong, same interval
    await expect(unauthenticated, rig.stub.CreateKey(adm.CreateKeyRequest(), metadata=demo))
    await expect(unauthenticated, rig.stub.GetStats(adm.GetStatsRequest(), metadata=twice))
    await rig.stub.ListKeys(adm.ListKeysRequest(), metadata=ADMIN)  # the right one: no count
    assert rig.refused == ["missing", "wrong", "wrong", "ambiguous"]
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 3, lines  # the second wrong one is within the first's interval
    for line, method in zip(lines, ("ListKeys", "RotateKey", "GetStats"), strict=True):
        assert method in line and "from ipv4:127.0.0.1:" in line, line
    assert "no admin token" in lines[0] and "wrong admin token" in lines[1], lines
    assert "more than one authorization header" in lines[2], lines
    # an interval on: the next wrong one is logged, with the one not logged
    rig.now[0] += AUTH_FAILED_LOG_EVERY_MS / 1000
    await expect(unauthenticated, rig.stub.SetPolicy(adm.SetPolicyRequest(), metadata=bearer))
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 4 and "SetPolicy" in lines[3] and "1 more since" in lines[3], lines
    assert _no_piece_of((ADMIN_TOKEN, wrong, rig.demo_key), caplog.text), caplog.text


async def test_every_admin_method_names_itself_when_refused(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """Each method checks the credential first, and its refusal's line names that method."""
    caplog.set_level(logging.WARNING, logger="cachemesh.admin")
    methods = adm.DESCRIPTOR.services_by_name["Admin"].methods
    for method in methods:
        rig.now[0] += AUTH_FAILED_LOG_EVERY_MS / 1000  # each its own line
        call = getattr(rig.stub, method.name)(getattr(adm, method.input_type.name)())
        await expect(grpc.StatusCode.UNAUTHENTICATED, call)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [line.split(" ")[1] for line in lines] == [m.name for m in methods], lines
    assert rig.refused == ["missing"] * len(methods)


def test_the_auth_failures_metric_is_at_zero_for_each_reason_from_the_start() -> None:
    registry = CollectorRegistry()
    metrics = RouterMetrics(registry, TenantLabels(10))
    metrics.admin_auth_failed("wrong")
    shown = generate_latest(registry).decode()
    for reason, count in (("missing", 0), ("wrong", 1), ("ambiguous", 0)):
        series = f'cachemesh_router_admin_auth_failures_total{{reason="{reason}"}} {count:.1f}'
        assert series in shown, shown


async def test_without_a_configured_token_the_admin_api_says_how_to_turn_it_on(
    tmp_path: Path,
) -> None:
    async for off in _rig(tmp_path, None):
        call = off.stub.ListKeys(adm.ListKeysRequest(), metadata=ADMIN)
        assert "CACHEMESH_ADMIN_TOKEN_FILE" in await expect(
            grpc.StatusCode.FAILED_PRECONDITION, call
        )


async def test_keys_are_created_listed_rotated_and_revoked(rig: Rig) -> None:
    issued = await rig.stub.CreateKey(
        adm.CreateKeyRequest(tenant="globex", name="ci"), metadata=ADMIN
    )
    assert issued.api_key.startswith("cm_") and issued.key.id.startswith("key_")
    assert issued.key.HasField("created_at") and not issued.key.HasField("revoked_at")
    assert rig.keys.tenant_for(issued.api_key) == "globex"
    assert issued.api_key not in rig.key_file.read_text()
    rotated = await rig.stub.RotateKey(adm.RotateKeyRequest(id=issued.key.id), metadata=ADMIN)
    assert rotated.key.id == issued.key.id and rotated.key.HasField("rotated_at")
    assert rig.keys.tenant_for(issued.api_key) is None
    assert rig.keys.tenant_for(rotated.api_key) == "globex"
    revoked = await rig.stub.RevokeKey(adm.RevokeKeyRequest(id=issued.key.id), metadata=ADMIN)
    assert revoked.HasField("revoked_at") and rig.keys.tenant_for(rotated.api_key) is None
    active = await rig.stub.ListKeys(adm.ListKeysRequest(tenant="globex"), metadata=ADMIN)
    assert list(active.keys) == []
    every = await rig.stub.ListKeys(
        adm.ListKeysRequest(tenant="globex", include_revoked=True), metadata=ADMIN
    )
    assert [k.id for k in every.keys] == [issued.key.id]


async def test_a_rotation_sent_with_the_key_as_seen_is_refused_when_another_came_first(
    rig: Rig,
) -> None:
    """Two operators see one key and rotate it: unconditionally the second's rotation
    revokes the first's new key without a word (main: 1 of 1); with the key as each saw it,
    the second is refused naming the first's rotation, and the first's key stays in force."""
    issued = await rig.stub.CreateKey(adm.CreateKeyRequest(tenant="globex"), metadata=ADMIN)
    seen = issued.key  # both operators saw it never rotated
    first = await rig.stub.RotateKey(
        adm.RotateKeyRequest(id=seen.id, if_never_rotated=True), metadata=ADMIN
    )
    second = rig.stub.RotateKey(
        adm.RotateKeyRequest(id=seen.id, if_never_rotated=True), metadata=ADMIN
    )
    details = await expect(grpc.StatusCode.FAILED_PRECONDITION, second)
    at = first.key.rotated_at.ToJsonString()  # 2026-...Z, nanoseconds as 0, 3, 6 or 9 digits
    assert f"key {seen.id} was last rotated at {at[:19]}" in details, details
    assert "never rotated (if_never_rotated)" in details and "nothing changed" in details
    assert rig.keys.tenant_for(first.api_key) == "globex"  # the first's key is in force
    # the rotated_at the first's reply gave is the key as it is: a rotation by it is made
    third = await rig.stub.RotateKey(
        adm.RotateKeyRequest(id=seen.id, if_rotated_at=first.key.rotated_at), metadata=ADMIN
    )
    assert rig.keys.tenant_for(third.api_key) == "globex"
    assert rig.keys.tenant_for(first.api_key) is None
    stale = rig.stub.RotateKey(
        adm.RotateKeyRequest(id=seen.id, if_rotated_at=first.key.rotated_at), metadata=ADMIN
    )
    details = await expect(grpc.StatusCode.FAILED_PRECONDITION, stale)
    assert "(if_rotated_at) as this request expected" in details, details
    assert third.key.rotated_at.ToJsonString()[:19] in details
    assert rig.keys.tenant_for(third.api_key) == "globex"
    # a key never rotated, sent a rotated_at: refused, saying it never was
    fresh = await rig.stub.CreateKey(adm.CreateKeyRequest(tenant="globex"), metadata=ADMIN)
    wrong = rig.stub.RotateKey(
        adm.RotateKeyRequest(id=fresh.key.id, if_rotated_at=first.key.rotated_at),
        metadata=ADMIN,
    )
    assert "has never been rotated" in await expect(grpc.StatusCode.FAILED_PRECONDITION, wrong)
    assert rig.keys.tenant_for(fresh.api_key) == "globex"
    # if_never_rotated=false says nothing a person meant: refused, naming the field
    unsaid = rig.stub.RotateKey(
        adm.RotateKeyRequest(id=fresh.key.id, if_never_rotated=False), metadata=ADMIN
    )
    assert "if_never_rotated must be true" in await expect(grpc.StatusCode.INVALID_ARGUMENT, unsaid)
    # unset (an older client): rotated whatever came before, as it was
    last = await rig.stub.RotateKey(adm.RotateKeyRequest(id=seen.id), metadata=ADMIN)
    assert rig.keys.tenant_for(last.api_key) == "globex"
    assert rig.keys.tenant_for(third.api_key) is None


async def test_a_revocation_sent_with_the_key_as_seen_is_refused_when_a_rotation_came_first(
    rig: Rig,
) -> None:
    """Operator A lists a key, operator B rotates it, A revokes the key it saw: unconditionally
    A's revocation kills B's new secret, maybe in use (main: 1 of 1, RevokeKeyRequest had no
    condition); with the key as A saw it, refused naming B's rotation, B's key in force. The
    same check as RotateKey's (one function), so the same refusal and the same field rules."""
    issued = await rig.stub.CreateKey(adm.CreateKeyRequest(tenant="globex"), metadata=ADMIN)
    seen = issued.key  # A saw it never rotated
    rotated = await rig.stub.RotateKey(adm.RotateKeyRequest(id=seen.id), metadata=ADMIN)  # B
    stale = rig.stub.RevokeKey(revoke_request(seen.id, seen), metadata=ADMIN)
    details = await expect(grpc.StatusCode.FAILED_PRECONDITION, stale)
    at = rotated.key.rotated_at.ToJsonString()
    assert details.startswith(
        f"key {seen.id} was last rotated at {at}, not never rotated (if_never_rotated) as this "
        "request expected; nothing changed"
    ), details
    assert "to revoke it still, revoke again with its rotated_at" in details, details
    assert rig.keys.tenant_for(rotated.api_key) == "globex"  # B's key is in force
    # a rotated_at A saw before B's rotation: refused the same way
    first = await rig.stub.RotateKey(adm.RotateKeyRequest(id=seen.id), metadata=ADMIN)
    await rig.stub.RotateKey(adm.RotateKeyRequest(id=seen.id), metadata=ADMIN)
    old = rig.stub.RevokeKey(revoke_request(seen.id, first.key), metadata=ADMIN)
    details = await expect(grpc.StatusCode.FAILED_PRECONDITION, old)
    assert f"not rotated at {first.key.rotated_at.ToJsonString()} (if_rotated_at)" in details
    # the field rules are RotateKey's: if_never_rotated=false and a stamp out of range refused
    unsaid = rig.stub.RevokeKey(
        adm.RevokeKeyRequest(id=seen.id, if_never_rotated=False), metadata=ADMIN
    )
    details = await expect(grpc.StatusCode.INVALID_ARGUMENT, unsaid)
    assert "if_never_rotated must be true" in details and "neither to revoke" in details
    wild = adm.RevokeKeyRequest(id=seen.id)
    wild.if_rotated_at.seconds = 10**15
    details = await expect(
        grpc.StatusCode.INVALID_ARGUMENT, rig.stub.RevokeKey(wild, metadata=ADMIN)
    )
    assert details.startswith("if_rotated_at is not a valid timestamp"), details
    listed = await rig.stub.ListKeys(adm.ListKeysRequest(tenant="globex"), metadata=ADMIN)
    now = listed.keys[0]
    assert [k.id for k in listed.keys] == [seen.id]  # nothing above revoked it
    # the key as it is now: revoked
    revoked = await rig.stub.RevokeKey(revoke_request(seen.id, now), metadata=ADMIN)
    assert revoked.HasField("revoked_at") and revoked.rotated_at == now.rotated_at
    assert rig.keys.tenant_for(rotated.api_key) is None
    # revoked already: as it is, whatever the condition (no secret of it is in force)
    again = await rig.stub.RevokeKey(revoke_request(seen.id, seen), metadata=ADMIN)
    assert again == revoked
    # a key never rotated and seen so: revoked; unset (an older client): revoked as before
    for condition in (True, False):
        fresh = await rig.stub.CreateKey(adm.CreateKeyRequest(tenant="globex"), metadata=ADMIN)
        sent = revoke_request(fresh.key.id, fresh.key if condition else None)
        assert sent.WhichOneof("if_unchanged") == ("if_never_rotated" if condition else None)
        assert (await rig.stub.RevokeKey(sent, metadata=ADMIN)).HasField("revoked_at")
        assert rig.keys.tenant_for(fresh.api_key) is None


async def test_the_cli_revokes_only_the_key_as_seen(
    rig: Rig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``cachemesh admin keys revoke --if-rotated-at STAMP|never``: RevokeKey's optimistic
    form from a terminal (main: no such flag, exit 2), refused exit 1 naming the rotation
    made since, the key then in force; made with the rotatedAt ``--json`` printed."""
    token_file = tmp_path / "admin-token"
    token_file.write_text(ADMIN_TOKEN)
    issued = await rig.stub.CreateKey(adm.CreateKeyRequest(tenant="globex"), metadata=ADMIN)
    rotated = await rig.stub.RotateKey(adm.RotateKeyRequest(id=issued.key.id), metadata=ADMIN)

    async def cli(*args: str) -> tuple[int, str]:
        argv = ["--target", rig.target, "admin", "--admin-token-file", str(token_file), *args]
        code = await asyncio.to_thread(main, argv)  # a sync client: off the servers' loop
        out = capsys.readouterr()
        return code, out.out + out.err

    code, said = await cli("keys", "revoke", issued.key.id, "--if-rotated-at", "never")
    assert code == 1 and "FAILED_PRECONDITION" in said, said
    assert f"key {issued.key.id} was last rotated at" in said, said
    assert rig.keys.tenant_for(rotated.api_key) == "globex"
    stamp = json.loads(as_json(rotated.key))["rotatedAt"]
    code, said = await cli("--json", "keys", "revoke", issued.key.id, "--if-rotated-at", stamp)
    assert code == 0 and "revokedAt" in json.loads(said), said
    assert rig.keys.tenant_for(rotated.api_key) is None


async def test_of_a_conditional_revocation_and_rotation_at_once_one_is_made(rig: Rig) -> None:
    """A revocation and a rotation of one key as seen, at once (each in a worker thread
    taking the key file's lock): one is made, the other refused FAILED_PRECONDITION; a
    rotation made first leaves its key in force (the revocation refused), a revocation made
    first refuses the rotation (the key revoked)."""
    for _ in range(10):
        issued = await rig.stub.CreateKey(adm.CreateKeyRequest(tenant="globex"), metadata=ADMIN)
        rotation, revocation = await asyncio.gather(
            rig.stub.RotateKey(rotate_request(issued.key.id, issued.key), metadata=ADMIN),
            rig.stub.RevokeKey(revoke_request(issued.key.id, issued.key), metadata=ADMIN),
            return_exceptions=True,
        )
        if isinstance(rotation, adm.IssuedKey):
            assert isinstance(revocation, grpc.aio.AioRpcError), revocation
            assert revocation.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert rig.keys.tenant_for(rotation.api_key) == "globex"
        else:
            assert isinstance(rotation, grpc.aio.AioRpcError), rotation
            assert rotation.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "revoked" in (rotation.details() or "")
            assert isinstance(revocation, adm.ApiKeyInfo) and revocation.HasField("revoked_at")


async def test_a_rotation_refused_names_the_stamps_exactly_as_json_prints_them(
    tmp_path: Path,
) -> None:
    """The refusal names the stamp in force and the one sent as ``cachemesh admin --json``
    prints them (a Timestamp's JSON form: 0, 3, 6 or 9 fraction digits), so a person finds
    the stamp in that listing whole (main: 9 digits always, "08:00:00.500000000Z" where
    --json said "08:00:00.500Z")."""
    now = [1_800_000_000.0]  # created at a whole second; rotated at .5 s, then at 1 s
    async for rig in _rig(tmp_path, AdminCredential(ADMIN_TOKEN), wall=lambda: now[0]):
        issued = await rig.stub.CreateKey(adm.CreateKeyRequest(tenant="globex"), metadata=ADMIN)
        now[0] = 1_800_000_000.5
        first = await rig.stub.RotateKey(adm.RotateKeyRequest(id=issued.key.id), metadata=ADMIN)
        first_at = json.loads(as_json(first.key))["rotatedAt"]
        assert first_at == "2027-01-15T08:00:00.500Z"  # the test's premise: 3 digits
        now[0] = 1_800_000_001.0
        second = await rig.stub.RotateKey(adm.RotateKeyRequest(id=issued.key.id), metadata=ADMIN)
        second_at = json.loads(as_json(second.key))["rotatedAt"]
        assert second_at == "2027-01-15T08:00:01Z"  # none
        stale = rig.stub.RotateKey(
            adm.RotateKeyRequest(id=issued.key.id, if_rotated_at=first.key.rotated_at),
            metadata=ADMIN,
        )
        details = await expect(grpc.StatusCode.FAILED_PRECONDITION, stale)
        assert (
            f"key {issued.key.id} was last rotated at {second_at}, not rotated at {first_at} "
            "(if_rotated_at) as this request expected"
        ) in details, details
        assert rig.keys.tenant_for(second.api_key) == "globex"


async def test_an_if_rotated_at_out_of_a_timestamps_range_is_invalid_argument(rig: Rig) -> None:
    """A stamp no Timestamp can hold (seconds past year 9999 or before year 1, nanos out of
    [0, 999999999]) is INVALID_ARGUMENT naming ``if_rotated_at`` (main: UNKNOWN with protobuf's
    raw ValueError), nothing changed; the range's own ends are stamps, compared as any."""
    issued = await rig.stub.CreateKey(adm.CreateKeyRequest(tenant="globex"), metadata=ADMIN)
    for seconds, nanos in [
        (10**15, 0),
        (0, -1),
        (0, 10**9),
        (253_402_300_800, 0),
        (-62_135_596_801, 0),
    ]:
        request = adm.RotateKeyRequest(id=issued.key.id)
        request.if_rotated_at.seconds, request.if_rotated_at.nanos = seconds, nanos
        details = await expect(
            grpc.StatusCode.INVALID_ARGUMENT, rig.stub.RotateKey(request, metadata=ADMIN)
        )
        assert details.startswith(
            f"if_rotated_at is not a valid timestamp (seconds {seconds}, nanos {nanos}"
        ), details
        assert rig.keys.tenant_for(issued.api_key) == "globex"
    for seconds, nanos in [(253_402_300_799, 999_999_999), (-62_135_596_800, 0)]:
        request = adm.RotateKeyRequest(id=issued.key.id)
        request.if_rotated_at.seconds, request.if_rotated_at.nanos = seconds, nanos
        details = await expect(
            grpc.StatusCode.FAILED_PRECONDITION, rig.stub.RotateKey(request, metadata=ADMIN)
        )
        assert f"{request.if_rotated_at.ToJsonString()} (if_rotated_at)" in details, details
        assert rig.keys.tenant_for(issued.api_key) == "globex"


async def test_of_two_conditional_rotations_at_once_one_is_made_and_one_refused(
    rig: Rig,
) -> None:
    """Rotations at once, each in a worker thread taking the key file's lock: the check is
    under that lock, so one of each pair is made and its key is the one in force."""
    issued = await rig.stub.CreateKey(adm.CreateKeyRequest(tenant="globex"), metadata=ADMIN)
    seen = issued.key
    for _ in range(10):
        request = rotate_request(seen.id, seen)
        replies = await asyncio.gather(
            rig.stub.RotateKey(request, metadata=ADMIN),
            rig.stub.RotateKey(request, metadata=ADMIN),
            return_exceptions=True,
        )
        made = [r for r in replies if isinstance(r, adm.IssuedKey)]
        refused = [r for r in replies if isinstance(r, grpc.aio.AioRpcError)]
        assert len(made) == 1 and len(refused) == 1, replies
        assert refused[0].code() == grpc.StatusCode.FAILED_PRECONDITION
        assert rig.keys.tenant_for(made[0].api_key) == "globex"
        seen = made[0].key


async def test_key_refusals_name_what_is_wrong(rig: Rig) -> None:
    invalid, missing = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    bad = rig.stub.CreateKey(adm.CreateKeyRequest(tenant="has space"), metadata=ADMIN)
    assert "tenant" in await expect(invalid, bad)
    # no tenant is the tenant's refusal, not a key id's (CreateKey takes no id)
    unnamed = rig.stub.CreateKey(adm.CreateKeyRequest(name="ci"), metadata=ADMIN)
    details = await expect(invalid, unnamed)
    assert details.startswith("tenant must be") and "id is required" not in details, details
    gone = rig.stub.RevokeKey(adm.RevokeKeyRequest(id="key_000000000000"), metadata=ADMIN)
    assert "key_000000000000" in await expect(missing, gone)
    # no id is the request's fault (it was NOT_FOUND), and rotating a revoked key is refused
    # for the key's state (it was INVALID_ARGUMENT, as if the request were malformed)
    for call in (rig.stub.RevokeKey(adm.RevokeKeyRequest(), metadata=ADMIN),
                 rig.stub.RotateKey(adm.RotateKeyRequest(), metadata=ADMIN)):  # fmt: skip
        assert "id is required" in await expect(invalid, call)
    issued = await rig.stub.CreateKey(adm.CreateKeyRequest(tenant="globex"), metadata=ADMIN)
    await rig.stub.RevokeKey(adm.RevokeKeyRequest(id=issued.key.id), metadata=ADMIN)
    again = rig.stub.RotateKey(adm.RotateKeyRequest(id=issued.key.id), metadata=ADMIN)
    assert "revoked" in await expect(grpc.StatusCode.FAILED_PRECONDITION, again)
    rig.key_file.write_text("acme:not-a-hash\n")  # a bad hand edit: nothing is written over it
    stuck = rig.stub.CreateKey(adm.CreateKeyRequest(tenant="globex"), metadata=ADMIN)
    details = await expect(grpc.StatusCode.FAILED_PRECONDITION, stuck)
    assert "api-keys:1" in details and "CACHEMESH_API_KEYS_FILE" in details
    assert rig.key_file.read_text() == "acme:not-a-hash\n"


async def test_invalidate_needs_a_target(rig: Rig) -> None:
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    untargeted = (
        adm.InvalidateRequest(tenant="acme"),
        adm.InvalidateRequest(tenant="acme", all=False),
    )
    for request in untargeted:
        assert "all=true" in await expect(invalid, rig.stub.Invalidate(request, metadata=ADMIN))
    purge = await rig.stub.Invalidate(
        adm.InvalidateRequest(tenant="acme", all=True), metadata=ADMIN
    )
    assert purge.dropped == 0
    no_tenant = rig.stub.Invalidate(adm.InvalidateRequest(all=True), metadata=ADMIN)
    assert "tenant" in await expect(invalid, no_tenant)


async def test_stats_of_a_tenant_name_an_older_cache_kept_asks_no_totals(rig: Rig) -> None:
    """An entry an older semantic-cache stored under a name the key file could not hold is
    listed (escaped by the CLI) without asking prefix-cache, which refuses such a name: it
    is not "prefix-cache NOT ANSWERING" for every tenant."""
    request = pb.CompleteRequest(model="sim-small")
    request.messages.add(role=pb.ROLE_USER).content.add(text="how do i reset my password")
    legacy = query_from_request("a\x00b", request)
    assert (await rig.cache.store(legacy, Answer(b"x", "end_turn", 1, False))).stored
    stats = await rig.stub.GetStats(adm.GetStatsRequest(), metadata=ADMIN)
    assert sorted(row.tenant for row in stats.tenants) == ["a\x00b", "acme"]
    assert Totals.asked == ["acme"] and list(stats.unavailable) == []


async def test_stats_join_keys_l1_and_the_billed_totals(rig: Rig) -> None:
    await rig.stub.SetPolicy(adm.SetPolicyRequest(tenant="acme", l1_enabled=False), metadata=ADMIN)
    stats = await rig.stub.GetStats(adm.GetStatsRequest(), metadata=ADMIN)
    (row,) = stats.tenants
    assert (row.tenant, row.active_keys, row.l1_enabled) == ("acme", 1, False)
    assert (row.model_requests, row.cost_nanos, row.baseline_nanos, row.saved_nanos) == (
        3,
        100,
        250,
        150,
    )
    assert list(stats.unavailable) == []


async def test_policy_round_trips_through_semantic_cache(rig: Rig) -> None:
    set_ = adm.SetPolicyRequest(tenant="acme", default_ttl_s=600.0)
    policy = await rig.stub.SetPolicy(set_, metadata=ADMIN)
    assert policy.l1_enabled and policy.default_ttl_s == 600.0
    got = await rig.stub.GetPolicy(adm.GetPolicyRequest(tenant="acme"), metadata=ADMIN)
    assert got == policy
    bad = rig.stub.SetPolicy(adm.SetPolicyRequest(tenant="acme", default_ttl_s=-1), metadata=ADMIN)
    assert "semantic-cache: default_ttl_s" in await expect(grpc.StatusCode.INVALID_ARGUMENT, bad)


async def test_stats_of_every_tenant_ask_an_older_prefix_cache_a_few_at_a_time(
    rig: Rig,
) -> None:
    """A prefix-cache without TotalsBatch (a rolling upgrade) is asked one Totals call a
    tenant, as before: not all at once (a thousand tenants, a burst of a thousand calls on the
    prefix-cache serving live traffic)."""
    Totals.batch = False
    with rig.key_file.open("a") as keys:
        keys.writelines(f"tenant-{i}:{hash_key(new_api_key())}\n" for i in range(60))
    stats = await rig.stub.GetStats(adm.GetStatsRequest(), metadata=ADMIN)
    assert len(stats.tenants) == 61 and not stats.unavailable
    assert all(row.model_requests == 3 and not row.unavailable for row in stats.tenants)
    assert 1 < Totals.peak <= 16, Totals.peak
    assert Totals.calls.count("Totals") == 61


async def test_stats_of_10000_tenants_ask_prefix_cache_once_a_page(rig: Rig) -> None:
    """10,000 tenants with 10,000 keys: GetStats of every tenant made 10,000 Totals calls, 16
    at a time within one 10 s deadline, and past ~6,000 of them every tenant came back as
    billed 0, said nowhere but in the reply's unavailable (5,309 of 10,000 on a real stack);
    finding each tenant's keys scanned every key for each tenant on the event loop (3.4 s).
    Now the tenants come in pages of 1,000, each page's totals in one TotalsBatch call."""
    with rig.key_file.open("a") as keys:
        keys.writelines(f"tenant-{i:05d}:{hash_key(new_api_key())}\n" for i in range(9_999))
    rows: list[adm.TenantStats] = []
    page_token, pages = "", 0
    while True:
        request = adm.GetStatsRequest(page_token=page_token)
        reply = await rig.stub.GetStats(request, metadata=ADMIN)
        assert len(reply.tenants) <= 1000 and not reply.unavailable
        rows += reply.tenants
        pages += 1
        page_token = reply.next_page_token
        if not page_token:
            break
    assert pages == 10 and len(rows) == 10_000
    assert [row.tenant for row in rows] == sorted({row.tenant for row in rows})
    assert all(row.model_requests == 3 and row.active_keys == 1 for row in rows)
    assert Totals.calls == ["TotalsBatch"] * 10 and len(Totals.asked) == 10_000


async def test_a_tenant_whose_totals_did_not_come_is_unknown_not_zero(rig: Rig) -> None:
    """prefix-cache failing for some tenants: their rows say prefix-cache is unavailable
    (the CLI prints "unknown"), none is a bare 0; the rows whose totals came are whole."""
    with rig.key_file.open("a") as keys:
        keys.writelines(f"tenant-{i:04d}:{hash_key(new_api_key())}\n" for i in range(2_500))
    Totals.failing.add("tenant-1500")  # the second page of 1,000 fails
    rows: list[adm.TenantStats] = []
    page_token = ""
    while True:
        request = adm.GetStatsRequest(page_token=page_token)
        reply = await rig.stub.GetStats(request, metadata=ADMIN)
        marked = [row for row in reply.tenants if row.unavailable]
        assert list(reply.unavailable) == (["prefix-cache"] if marked else [])
        rows += reply.tenants
        page_token = reply.next_page_token
        if not page_token:
            break
    unknown = [row for row in rows if list(row.unavailable) == ["prefix-cache"]]
    assert len(rows) == 2_501 and len(unknown) == 1_000
    assert all(row.model_requests == 0 and row.cost_nanos == 0 for row in unknown)
    assert all(row.model_requests == 3 for row in rows if not row.unavailable)


async def test_stats_pages_follow_one_another_and_refuse_a_bad_token(rig: Rig) -> None:
    with rig.key_file.open("a") as keys:
        keys.writelines(f"t{i}:{hash_key(new_api_key())}\n" for i in range(4))
    first = await rig.stub.GetStats(adm.GetStatsRequest(page_size=3), metadata=ADMIN)
    assert [row.tenant for row in first.tenants] == ["acme", "t0", "t1"]
    # a tenant created between two pages, before the cursor, moves nothing into the next page
    await rig.stub.CreateKey(adm.CreateKeyRequest(tenant="a-new"), metadata=ADMIN)
    second = await rig.stub.GetStats(
        adm.GetStatsRequest(page_size=3, page_token=first.next_page_token), metadata=ADMIN
    )
    assert [row.tenant for row in second.tenants] == ["t2", "t3"]
    assert second.next_page_token == ""
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    for request in (
        adm.GetStatsRequest(page_token="not-a-token"),
        adm.GetStatsRequest(page_token=first.next_page_token, tenant="acme"),
        adm.GetStatsRequest(page_size=-1),
    ):
        details = await expect(invalid, rig.stub.GetStats(request, metadata=ADMIN))
        assert details.startswith(("page_token: ", "page_size: ")), details
    keys_token = (
        await rig.stub.ListKeys(adm.ListKeysRequest(page_size=1), metadata=ADMIN)
    ).next_page_token
    wrong_kind = rig.stub.GetStats(adm.GetStatsRequest(page_token=keys_token), metadata=ADMIN)
    assert "not one this call made" in await expect(invalid, wrong_kind)


class OlderL1(SemanticCacheService):
    """A semantic-cache older than Stats pages: it reads no page_size, answers every tenant,
    and says nothing of whether it knows a tenant (known, known_as)."""

    async def Stats(self, request: sc.L1StatsRequest, context: Context) -> sc.L1StatsResponse:
        reply = await super().Stats(sc.L1StatsRequest(tenant=request.tenant), context)
        reply.ClearField("known")
        reply.ClearField("known_as")
        return reply


def _l1_policies(path: Path, tenants: list[str]) -> TenantPolicies:
    """L1 figures of ``tenants``: a policy each (L1 off), as semantic-cache reads its file."""
    doc = {"version": 1, "tenants": {t: {"l1_enabled": False} for t in tenants}}
    path.write_text(json.dumps(doc))
    return TenantPolicies(path)


async def test_stats_of_70000_l1_tenants_ask_l1_for_a_page_not_every_tenant(
    tmp_path: Path,
) -> None:
    """Each GetStats page asked semantic-cache for every tenant's row: at 70,000 tenants of
    64-character names that reply was 4,760,002 bytes, over gRPC's 4 MiB limit, and every row
    of every page said semantic-cache unavailable (its figures unknown). Now L1 is asked for
    the page's tenants only (L1StatsRequest.page_size)."""
    tenants = [f"t{i:063d}" for i in range(70_000)]
    policies = _l1_policies(tmp_path / "tenant-policies.json", tenants)
    async for rig in _rig(tmp_path, AdminCredential(ADMIN_TOKEN), l1_policies=policies):
        rows: list[adm.TenantStats] = []
        page_token = ""
        for _ in range(3):
            request = adm.GetStatsRequest(page_token=page_token)
            reply = await rig.stub.GetStats(request, metadata=ADMIN)
            assert list(reply.unavailable) == [] and len(reply.tenants) == 1000
            rows += reply.tenants
            page_token = reply.next_page_token
        assert [row.tenant for row in rows] == ["acme", *tenants[:2_999]]
        assert not any(row.unavailable or row.l1_enabled for row in rows[1:])


@pytest.mark.parametrize("l1_service", [SemanticCacheService, OlderL1])
async def test_a_tenant_without_a_key_is_found_known_or_not_among_70000_l1_tenants(
    tmp_path: Path, l1_service: type[SemanticCacheService]
) -> None:
    """Invalidate, GetPolicy and SetPolicy of a tenant without a key asked L1 for every
    tenant's row to learn whether it knew the tenant (or one differing in case): at 70,000
    tenants of 64-character names that reply was over gRPC's 4 MiB limit and the call failed
    RESOURCE_EXHAUSTED. Now L1 is asked about that tenant alone (an older L1: every row, as
    before, tried here with 3 tenants)."""
    count = 70_000 if l1_service is SemanticCacheService else 3
    tenants = [f"t{i:063d}" for i in range(count)]
    policies = _l1_policies(tmp_path / "tenant-policies.json", tenants)
    credential = AdminCredential(ADMIN_TOKEN)
    async for rig in _rig(tmp_path, credential, l1_policies=policies, l1_service=l1_service):
        known = await rig.stub.GetPolicy(adm.GetPolicyRequest(tenant=tenants[1]), metadata=ADMIN)
        assert (known.l1_enabled, known.unknown_tenant) == (False, False)
        typo = tenants[2].upper()
        purge = await rig.stub.Invalidate(
            adm.InvalidateRequest(tenant=typo, all=True), metadata=ADMIN
        )
        assert (purge.unknown_tenant, purge.known_as) == (True, tenants[2])
        purge = await rig.stub.Invalidate(
            adm.InvalidateRequest(tenant="ACME", all=True), metadata=ADMIN
        )
        assert (purge.unknown_tenant, purge.known_as) == (True, "acme")  # a key's tenant
        nobody = await rig.stub.GetPolicy(adm.GetPolicyRequest(tenant="nobody"), metadata=ADMIN)
        assert nobody.unknown_tenant and not nobody.HasField("known_as")


@pytest.mark.parametrize("l1_service", [SemanticCacheService, OlderL1])
async def test_stats_pages_merge_the_keys_and_l1s_pages_each_tenant_once(
    tmp_path: Path, l1_service: type[SemanticCacheService]
) -> None:
    """L1's page ends before the keys' (a key's tenant past it comes in a later page, after
    L1's tenants before it), and the other way round; an L1 without pages (its every tenant
    in each reply) gives the same pages."""
    policies = _l1_policies(tmp_path / "tenant-policies.json", ["a", "c", "e", "g", "h"])
    credential = AdminCredential(ADMIN_TOKEN)
    async for rig in _rig(tmp_path, credential, l1_policies=policies, l1_service=l1_service):
        with rig.key_file.open("a") as keys:  # acme's key is there already
            keys.writelines(f"{t}:{hash_key(new_api_key())}\n" for t in ("b", "d", "f"))
        pages: list[list[str]] = []
        page_token = ""
        while True:
            request = adm.GetStatsRequest(page_size=2, page_token=page_token)
            reply = await rig.stub.GetStats(request, metadata=ADMIN)
            assert list(reply.unavailable) == []
            pages.append([row.tenant for row in reply.tenants])
            for row in reply.tenants:
                assert (row.active_keys, row.l1_enabled) == (
                    (1, True) if row.tenant in ("acme", "b", "d", "f") else (0, False)
                )
            page_token = reply.next_page_token
            if not page_token:
                break
        assert pages == [["a", "acme"], ["b", "c"], ["d", "e"], ["f", "g"], ["h"]]


async def test_keys_come_in_pages_far_below_the_message_limit(rig: Rig) -> None:
    """~89,000 keys made one ListKeys reply over gRPC's 4 MiB limit: it failed
    RESOURCE_EXHAUSTED ("Sent message larger than max"). Pages of at most 1,000 keys."""
    with rig.key_file.open("a") as keys:
        keys.writelines(f"t{i % 7}:{hash_key(new_api_key())}\n" for i in range(2_400))
    ids: list[str] = []
    sizes: list[int] = []
    page_token = ""
    while True:
        request = adm.ListKeysRequest(page_token=page_token, page_size=5_000)  # 1,000 at most
        reply = await rig.stub.ListKeys(request, metadata=ADMIN)
        sizes.append(reply.ByteSize())
        ids += [key.id for key in reply.keys]
        page_token = reply.next_page_token
        if not page_token:
            break
    assert len(ids) == len(set(ids)) == 2_401
    assert len(sizes) == 3 and max(sizes) < 256 * 1024, sizes
    small = await rig.stub.ListKeys(adm.ListKeysRequest(tenant="t3", page_size=2), metadata=ADMIN)
    assert len(small.keys) == 2 and {k.tenant for k in small.keys} == {"t3"}
    other_filter = adm.ListKeysRequest(tenant="t4", page_token=small.next_page_token)
    details = await expect(
        grpc.StatusCode.INVALID_ARGUMENT, rig.stub.ListKeys(other_filter, metadata=ADMIN)
    )
    assert "same tenant, include_revoked" in details, details


async def test_stats_of_every_tenant_wait_one_timeout_for_a_silent_prefix_cache(
    tmp_path: Path,
) -> None:
    """Asked a few at a time, each with the whole timeout, the totals of 61 tenants took one
    timeout a batch of 16 (4 of them: 2 s for a 0.5 s timeout, 10 minutes for the default
    10 s and 1,000 tenants), and a client's deadline lost the keys and L1 rows too."""
    Totals.hang = True
    try:
        async for rig in _rig(tmp_path, AdminCredential(ADMIN_TOKEN), timeout_s=0.5):
            with rig.key_file.open("a") as keys:
                keys.writelines(f"tenant-{i}:{hash_key(new_api_key())}\n" for i in range(60))
            for batch in (True, False):  # TotalsBatch, and Totals of an older prefix-cache
                Totals.batch = batch
                stats = await rig.stub.GetStats(adm.GetStatsRequest(), metadata=ADMIN, timeout=1.5)
                assert list(stats.unavailable) == ["prefix-cache"] and len(stats.tenants) == 61
                assert all(list(row.unavailable) == ["prefix-cache"] for row in stats.tenants)
    finally:
        Totals.hang = False


async def test_stats_say_which_service_did_not_answer(tmp_path: Path) -> None:
    async for rig in _rig(tmp_path, AdminCredential(ADMIN_TOKEN), semantic_up=False):
        stats = await rig.stub.GetStats(adm.GetStatsRequest(), metadata=ADMIN)
        assert list(stats.unavailable) == ["semantic-cache"]
        assert [row.tenant for row in stats.tenants] == ["acme"]
        assert list(stats.tenants[0].unavailable) == ["semantic-cache"]


async def test_the_routers_internal_credential_refused_is_not_the_callers_fault(
    tmp_path: Path,
) -> None:
    """semantic-cache refusing the router's internal token is an operator's fault: the caller,
    whose admin token is right, is not told UNAUTHENTICATED (it would look for its own)."""
    wrong = "another-internal-token-0123456789"
    async for rig in _rig(tmp_path, AdminCredential(ADMIN_TOKEN), router_internal=wrong):
        purge = rig.stub.Invalidate(adm.InvalidateRequest(tenant="acme", all=True), metadata=ADMIN)
        details = await expect(grpc.StatusCode.INTERNAL, purge)
        assert "internal credential" in details and wrong not in details


def test_the_admin_token_is_checked_at_start_up(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not both"):
        admin_credential_from_env(
            Env({"CACHEMESH_ADMIN_TOKEN": ADMIN_TOKEN, "CACHEMESH_ADMIN_TOKEN_FILE": "x"}),
            INTERNAL,
        )
    with pytest.raises(ConfigError, match="at least 16"):
        admin_credential_from_env(Env({"CACHEMESH_ADMIN_TOKEN": "short"}), INTERNAL)
    # what gRPC metadata cannot carry was accepted, and no client could present it
    for unsendable in ("geheimes-passwört-2024", "\ufeff" + ADMIN_TOKEN):
        with pytest.raises(ConfigError, match="printable ASCII") as refused:
            admin_credential_from_env(Env({"CACHEMESH_ADMIN_TOKEN": unsendable}), INTERNAL)
        assert "passw" not in str(refused.value) and ADMIN_TOKEN not in str(refused.value)
    with pytest.raises(ConfigError, match="CACHEMESH_ADMIN_TOKEN_FILE: cannot read"):
        admin_credential_from_env(
            Env({"CACHEMESH_ADMIN_TOKEN_FILE": str(tmp_path / "none")}), INTERNAL
        )
    (tmp_path / "token").write_text(ADMIN_TOKEN + "\n")
    credential = admin_credential_from_env(
        Env({"CACHEMESH_ADMIN_TOKEN_FILE": str(tmp_path / "token")}), INTERNAL
    )
    assert credential is not None and credential.matches(ADMIN_TOKEN)
    assert not credential.matches(None) and not credential.matches(ADMIN_TOKEN[:-1])
    assert ADMIN_TOKEN not in repr(credential)
    assert admin_credential_from_env(Env({}), INTERNAL) is None


def test_an_admin_token_equal_to_the_internal_one_stops_the_router(tmp_path: Path) -> None:
    """Every service holds the internal credential: the same value as the admin token let any
    of them (or whoever read one's secret) open the Admin API. Refused at start, naming both
    variables, never the value; whichever way each is given."""
    environ = {
        **read_env_file(ROOT / ".env"),
        "CACHEMESH_API_KEYS_FILE": "/dev/null",
        "CACHEMESH_INTERNAL_TOKEN": INTERNAL,
        "CACHEMESH_ADMIN_TOKEN": INTERNAL,
    }
    (tmp_path / "admin").write_text(INTERNAL + "\n")
    as_file = {
        **environ,
        "CACHEMESH_ADMIN_TOKEN": "",
        "CACHEMESH_ADMIN_TOKEN_FILE": str(tmp_path / "admin"),
    }
    for given in (environ, as_file):
        env = Env(given)
        with pytest.raises(ConfigError) as refused:
            RouterSettings.from_env(env, model_table_from_env(env))
        said = str(refused.value)
        assert "CACHEMESH_ADMIN_TOKEN" in said and "CACHEMESH_INTERNAL_TOKEN" in said, said
        assert INTERNAL not in said and INTERNAL[-8:] not in said
    # a token of its own starts it, with the Admin API on
    env = Env({**environ, "CACHEMESH_ADMIN_TOKEN": ADMIN_TOKEN})
    settings = RouterSettings.from_env(env, model_table_from_env(env))
    assert settings.admin is not None and settings.admin.matches(ADMIN_TOKEN)


async def test_invalidate_takes_no_namespace_or_entry_id_longer_than_the_gateways(rig: Rig) -> None:
    """A namespace the Gateway would refuse (over 128 characters) names no entry, and an entry
    id is 32; each was written to semantic-cache's journal whatever its length (1 MB a call)."""
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    request = adm.InvalidateRequest(tenant="acme", namespace="n" * 1_000_000)
    details = await expect(invalid, rig.stub.Invalidate(request, metadata=ADMIN))
    assert details.startswith("namespace: at most 128 characters"), details
    assert len(details) < 200
    # what a request's cache.namespace may be, the Gateway's rule: its length alone
    for namespace in ("n" * 128, " ", "billing"):
        request = adm.InvalidateRequest(tenant="acme", namespace=namespace)
        assert (await rig.stub.Invalidate(request, metadata=ADMIN)).dropped == 0


@pytest.mark.parametrize(
    "entry_id",
    [" " + "a" * 32, "zzz", "a\nb", "e" * 129, "A" * 32, "a" * 31, "g" * 32, "\u00e9" * 100],
)
async def test_invalidate_takes_only_an_entry_id_l1_could_have_made(
    rig: Rig, entry_id: str
) -> None:
    """An entry id is ``uuid4().hex``: anything else names no entry, was answered "dropped 0"
    (as if it had been removed) and was written to L1's journal."""
    request = adm.InvalidateRequest(tenant="acme", entry_id=entry_id)
    details = await expect(
        grpc.StatusCode.INVALID_ARGUMENT, rig.stub.Invalidate(request, metadata=ADMIN)
    )
    assert details.startswith("entry_id: must be 32 lowercase hex digits"), details
    assert len(details) < 300


async def test_invalidate_of_a_well_formed_entry_id_reaches_l1(rig: Rig) -> None:
    request = adm.InvalidateRequest(tenant="acme", entry_id="0123456789abcdef" * 2)
    assert (await rig.stub.Invalidate(request, metadata=ADMIN)).dropped == 0


@pytest.mark.parametrize("tenant", [" acme", "acme\n", "no such tenant", "-acme", "t" * 65])
async def test_invalidate_takes_only_a_tenant_the_key_file_could_name(
    rig: Rig, tenant: str
) -> None:
    request = adm.InvalidateRequest(tenant=tenant, all=True)
    details = await expect(
        grpc.StatusCode.INVALID_ARGUMENT, rig.stub.Invalidate(request, metadata=ADMIN)
    )
    assert details.startswith("tenant must be 1 to 64 letters"), details


async def test_a_policy_for_an_unknown_tenant_is_refused_naming_the_known_one(rig: Rig) -> None:
    """``policy set Tenant-B --l1 off`` printed "L1 off" while tenant-b stayed on: the policy
    went to a tenant with no key, no L1 entry and no policy. Now that needs new_tenant (a policy
    set before a tenant's first key is legitimate), and the refusal names the tenant that
    differs only in case."""
    typo = adm.SetPolicyRequest(tenant="ACME", l1_enabled=False)
    refused = await expect(
        grpc.StatusCode.FAILED_PRECONDITION, rig.stub.SetPolicy(typo, metadata=ADMIN)
    )
    assert "tenant ACME is unknown" in refused and "'acme'" in refused
    assert "new_tenant" in refused
    acme = await rig.stub.GetPolicy(adm.GetPolicyRequest(tenant="acme"), metadata=ADMIN)
    assert acme.l1_enabled and not acme.unknown_tenant
    early = adm.SetPolicyRequest(tenant="globex", l1_enabled=False, new_tenant=True)
    policy = await rig.stub.SetPolicy(early, metadata=ADMIN)
    assert not policy.l1_enabled and policy.unknown_tenant and not policy.known_as
    # once it has a policy, it is known
    again = await rig.stub.SetPolicy(adm.SetPolicyRequest(tenant="globex"), metadata=ADMIN)
    assert not again.l1_enabled and not again.unknown_tenant


async def test_invalidate_of_an_unknown_tenant_says_so(rig: Rig) -> None:
    purge = adm.InvalidateRequest(tenant="Acme", all=True)
    reply = await rig.stub.Invalidate(purge, metadata=ADMIN)
    assert (reply.dropped, reply.unknown_tenant, reply.known_as) == (0, True, "acme")
    known = await rig.stub.Invalidate(
        adm.InvalidateRequest(tenant="acme", all=True), metadata=ADMIN
    )
    assert (known.dropped, known.unknown_tenant, known.HasField("known_as")) == (0, False, False)
    got = await rig.stub.GetPolicy(adm.GetPolicyRequest(tenant="Acme"), metadata=ADMIN)
    assert got.unknown_tenant and got.known_as == "acme"


def _change(value: int = 0, *, unlimited: bool = False, default: bool = False) -> adm.LimitChange:
    if unlimited:
        return adm.LimitChange(unlimited=True)
    if default:
        return adm.LimitChange(use_default=True)
    return adm.LimitChange(value=value)


async def test_a_tenants_limits_are_set_read_listed_and_taken_back(rig: Rig) -> None:
    got = await rig.stub.GetLimits(adm.GetLimitsRequest(tenant="acme"), metadata=ADMIN)
    assert got.requests_per_min == adm.Limit(value=600, own=False)  # the router's
    assert not got.tokens_per_min.HasField("value") and not got.tokens_per_min.own
    assert not got.unknown_tenant and not got.HasField("updated_at")
    change = adm.SetLimitsRequest(
        tenant="acme",
        requests_per_min=_change(10),
        tokens_per_min=_change(5000),
        day_budget_nanos=_change(unlimited=True),
        month_budget_nanos=_change(0),
    )
    limits = await rig.stub.SetLimits(change, metadata=ADMIN)
    assert limits.requests_per_min == adm.Limit(value=10, own=True)
    assert limits.tokens_per_min == adm.Limit(value=5000, own=True)
    assert limits.day_budget_nanos == adm.Limit(own=True)  # its own: unlimited
    assert limits.month_budget_nanos == adm.Limit(value=0, own=True)
    assert limits.HasField("updated_at")
    assert rig.limits.for_tenant("acme") == LimitPolicy(10, 5000, None, 0)
    assert rig.limits.for_tenant("globex") == LIMIT_DEFAULTS
    assert await rig.stub.GetLimits(adm.GetLimitsRequest(tenant="acme"), metadata=ADMIN) == limits
    listed = await rig.stub.ListLimits(adm.ListLimitsRequest(), metadata=ADMIN)
    assert [t.tenant for t in listed.tenants] == ["acme"] and listed.tenants[0] == limits
    assert listed.defaults.requests_per_min == adm.Limit(value=600)
    back = adm.SetLimitsRequest(
        tenant="acme",
        requests_per_min=_change(default=True),
        tokens_per_min=_change(default=True),
        day_budget_nanos=_change(default=True),
        month_budget_nanos=_change(default=True),
    )
    cleared = await rig.stub.SetLimits(back, metadata=ADMIN)
    assert cleared.requests_per_min == adm.Limit(value=600) and not cleared.HasField("updated_at")
    assert rig.limits.for_tenant("acme") == LIMIT_DEFAULTS
    assert not (await rig.stub.ListLimits(adm.ListLimitsRequest(), metadata=ADMIN)).tenants


async def test_tenants_with_limits_of_their_own_are_listed_in_pages(rig: Rig) -> None:
    """ListLimits was one reply of every such tenant: ~60,000 of them (28-character names,
    every limit set) passed gRPC's 4 MiB limit and the call failed RESOURCE_EXHAUSTED
    ("Received message larger than max (4800020 vs. 4194304)")."""
    for tenant in ("delta", "acme", "charlie", "bravo", "echo"):
        change = adm.SetLimitsRequest(tenant=tenant, requests_per_min=_change(7), new_tenant=True)
        await rig.stub.SetLimits(change, metadata=ADMIN)
    first = await rig.stub.ListLimits(adm.ListLimitsRequest(page_size=2), metadata=ADMIN)
    assert [t.tenant for t in first.tenants] == ["acme", "bravo"] and first.next_page_token
    assert first.defaults.requests_per_min == adm.Limit(value=600)
    # a tenant added before the cursor moves no other tenant into or out of the next page
    change = adm.SetLimitsRequest(tenant="aaron", requests_per_min=_change(7), new_tenant=True)
    await rig.stub.SetLimits(change, metadata=ADMIN)
    second = await rig.stub.ListLimits(
        adm.ListLimitsRequest(page_size=2, page_token=first.next_page_token), metadata=ADMIN
    )
    assert [t.tenant for t in second.tenants] == ["charlie", "delta"]
    assert second.tenants[0].requests_per_min == adm.Limit(value=7, own=True)
    last = await rig.stub.ListLimits(
        adm.ListLimitsRequest(page_size=2, page_token=second.next_page_token), metadata=ADMIN
    )
    assert [t.tenant for t in last.tenants] == ["echo"] and last.next_page_token == ""
    whole = await rig.stub.ListLimits(adm.ListLimitsRequest(), metadata=ADMIN)  # 0: up to 1,000
    assert len(whole.tenants) == 6 and whole.next_page_token == ""


async def test_a_request_without_page_size_is_answered_whole_or_refused(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client from before pages sends ListLimitsRequest() / ListKeysRequest() and reads one
    reply: it was given the first page as the whole (1,000 of 1,005 tenants, no word). Such
    a request is answered every row while they fit one reply, else refused naming the
    upgrade; a request with page_size still gets pages. (PAGE_MAX 3 here: 1,000 rows.)"""
    monkeypatch.setattr(admin_pages, "PAGE_MAX", 3)
    for tenant in ("delta", "acme", "charlie", "bravo", "echo"):
        change = adm.SetLimitsRequest(tenant=tenant, requests_per_min=_change(7), new_tenant=True)
        await rig.stub.SetLimits(change, metadata=ADMIN)
    with rig.key_file.open("a") as keys:
        keys.writelines(f"t{i}:{hash_key(new_api_key())}\n" for i in range(4))
    old = await rig.stub.ListLimits(adm.ListLimitsRequest(), metadata=ADMIN)
    assert [t.tenant for t in old.tenants] == ["acme", "bravo", "charlie", "delta", "echo"]
    assert old.next_page_token == "" and old.defaults.requests_per_min == adm.Limit(value=600)
    old_keys = await rig.stub.ListKeys(adm.ListKeysRequest(), metadata=ADMIN)
    assert [k.tenant for k in old_keys.keys] == ["acme", "t0", "t1", "t2", "t3"]
    assert old_keys.next_page_token == ""
    paged = await rig.stub.ListLimits(adm.ListLimitsRequest(page_size=5), metadata=ADMIN)
    assert len(paged.tenants) == 3 and paged.next_page_token  # at most PAGE_MAX
    monkeypatch.setattr(admin_pages, "WHOLE_REPLY_BYTES", 60)  # a row or two
    refusals = [
        await expect(
            grpc.StatusCode.FAILED_PRECONDITION,
            rig.stub.ListLimits(adm.ListLimitsRequest(), metadata=ADMIN),
        ),
        await expect(
            grpc.StatusCode.FAILED_PRECONDITION,
            rig.stub.ListKeys(adm.ListKeysRequest(), metadata=ADMIN),
        ),
    ]
    assert refusals[0].startswith("the 5 tenants with limits of their own do not fit one reply")
    assert refusals[1].startswith("the 5 keys do not fit one reply")
    assert all("Upgrade the cachemesh CLI / AdminClient" in said for said in refusals)
    one = await rig.stub.ListKeys(adm.ListKeysRequest(tenant="t0"), metadata=ADMIN)
    assert [k.tenant for k in one.keys] == ["t0"]  # one tenant's fit
    listed = await rig.stub.ListLimits(adm.ListLimitsRequest(page_size=3), metadata=ADMIN)
    assert len(listed.tenants) == 3  # a paging client is not held to it


@pytest.mark.parametrize(
    ("page_size", "page_token", "said"),
    [
        (-1, "", "page_size: must be 0"),
        (0, "not-a-token", "page_token: not one this call made"),
        (0, token("keys", {"tenant": "", "include_revoked": False}, ["a", 1.0, "b"]),
         "page_token: not one this call made"),
        (0, token("limits", {}, [1]), "page_token: not one ListLimits made"),
    ],
)  # fmt: skip
async def test_a_bad_page_of_limits_is_refused_naming_the_field(
    rig: Rig, page_size: int, page_token: str, said: str
) -> None:
    request = adm.ListLimitsRequest(page_size=page_size, page_token=page_token)
    details = await expect(
        grpc.StatusCode.INVALID_ARGUMENT, rig.stub.ListLimits(request, metadata=ADMIN)
    )
    assert said in details


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (adm.SetLimitsRequest(tenant="acme"), "say what to change: one or more of"),
        (
            adm.SetLimitsRequest(tenant="acme", requests_per_min=_change(0)),
            "requests_per_min must be whole requests a minute, from 1",
        ),
        (
            adm.SetLimitsRequest(tenant="acme", tokens_per_min=_change(-1)),
            "tokens_per_min must be whole tokens a minute",
        ),
        (
            adm.SetLimitsRequest(tenant="acme", day_budget_nanos=_change(-5)),
            "day_budget_nanos must be whole nano-dollars a UTC day (1 US dollar = ",
        ),
        (
            adm.SetLimitsRequest(tenant="acme", month_budget_nanos=_change(10**19 // 2)),
            "($9,000,000",
        ),
        (adm.SetLimitsRequest(tenant="a b", requests_per_min=_change(1)), "tenant must be"),
    ],
)
async def test_a_limit_out_of_range_is_refused_with_its_unit(
    rig: Rig, change: adm.SetLimitsRequest, said: str
) -> None:
    details = await expect(
        grpc.StatusCode.INVALID_ARGUMENT, rig.stub.SetLimits(change, metadata=ADMIN)
    )
    assert said in details
    assert rig.limits.store.overrides() == []  # nothing written


async def test_limits_for_an_unknown_tenant_need_new_tenant(rig: Rig) -> None:
    typo = adm.SetLimitsRequest(tenant="ACME", requests_per_min=_change(1))
    details = await expect(
        grpc.StatusCode.FAILED_PRECONDITION, rig.stub.SetLimits(typo, metadata=ADMIN)
    )
    assert "did you mean 'acme'?" in details and "--new-tenant" in details
    assert rig.limits.store.overrides() == []
    early = adm.SetLimitsRequest(tenant="globex", day_budget_nanos=_change(5), new_tenant=True)
    limits = await rig.stub.SetLimits(early, metadata=ADMIN)
    assert limits.unknown_tenant and limits.day_budget_nanos == adm.Limit(value=5, own=True)
    # once it has limits of its own, it is known
    again = adm.SetLimitsRequest(tenant="globex", day_budget_nanos=_change(6))
    assert not (await rig.stub.SetLimits(again, metadata=ADMIN)).unknown_tenant
    got = await rig.stub.GetLimits(adm.GetLimitsRequest(tenant="initech"), metadata=ADMIN)
    assert got.unknown_tenant and got.requests_per_min == adm.Limit(value=600)


async def test_limits_need_the_admin_token(rig: Rig) -> None:
    for call in (
        rig.stub.GetLimits(adm.GetLimitsRequest(tenant="acme")),
        rig.stub.ListLimits(adm.ListLimitsRequest()),
        rig.stub.SetLimits(adm.SetLimitsRequest(tenant="acme", requests_per_min=_change(1))),
    ):
        await expect(grpc.StatusCode.UNAUTHENTICATED, call)


async def test_a_limits_file_it_cannot_write_is_said_so(rig: Rig, tmp_path: Path) -> None:
    (tmp_path / "tenant-limits").mkdir()  # a directory where the file goes: its read fails
    change = adm.SetLimitsRequest(tenant="acme", requests_per_min=_change(1))
    details = await expect(
        grpc.StatusCode.FAILED_PRECONDITION, rig.stub.SetLimits(change, metadata=ADMIN)
    )
    assert "tenant limits file could not be changed" in details
    assert "ROUTER_TENANT_LIMITS_FILE" in details
