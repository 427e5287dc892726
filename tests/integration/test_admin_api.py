"""The Admin API on real processes, without restarting any: the session's stack (its router, HTTP
front, semantic-cache, prefix-cache) and a second router beside it on the same key file.

A key is created (through the CLI) for a new tenant, used on both routers, rotated (the old one
refused everywhere, the new one accepted), revoked (refused by both routers and the HTTP
front); one tenant's L1 is purged (its next question is a miss, the other tenant's the same
question still a hit); a tenant's L1 is turned off and on. The pid of every process is the same
at the end: nothing was restarted. How long a change took to reach the other router is printed
(pytest -s), not asserted: the bound (CACHEMESH_API_KEYS_POLL_S, at most 1 s, plus one re-read
in a worker thread) is the key store's, tested with an injected clock and re-read in
tests/unit/test_key_store.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from cachemesh import AuthenticationError, CachemeshError, Client, build_request
from cachemesh.admin import AdminClient
from cachemesh.v1 import gateway_pb2 as pb
from services.tools.stack.health import SERVING, probe
from tests.integration.extra_processes import loopback, post_message, process, service_env
from tests.integration.harness import ROOT, RunningStack

pytestmark = pytest.mark.integration

QUESTION = "How do I change the email address on my account?"


@pytest.fixture(scope="module")
def second_router(stack: RunningStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Another router on the stack's own key file, caches and replicas."""
    address = loopback()
    env = service_env(stack, "router", {"ROUTER_LISTEN": address})
    log = tmp_path_factory.mktemp("admin") / "router-2.log"
    with process("services.router", env, log, lambda: probe(address) == SERVING):
        yield address


def _admin_token(stack: RunningStack) -> str:
    return (stack.stack.run_dir / "admin-token").read_text().strip()


def _cli(stack: RunningStack, *args: str, exits: int = 0) -> str:
    """``cachemesh --target <router> admin ...`` as a person runs it (the token by its file);
    its output (and its errors'), having exited ``exits``."""
    env = {**os.environ, "CACHEMESH_ADMIN_TOKEN_FILE": str(stack.stack.run_dir / "admin-token")}
    env.pop("CACHEMESH_ADMIN_TOKEN", None)
    done = subprocess.run(
        [sys.executable, "-m", "cachemesh.cli", "--target", stack.target, "admin", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == exits, done.stderr
    return done.stdout + done.stderr


def _ask(address: str, key: str, question: str, namespace: str) -> pb.CompleteResponse:
    with Client(address, api_key=key, timeout_s=60, max_attempts=1) as client:
        return client.complete(build_request(question, namespace=namespace, model="sim-small"))


def _accepted(address: str, key: str) -> bool:
    try:
        _ask(address, key, f"Are you there? {uuid.uuid4().hex}", "admin-probe")
    except AuthenticationError:
        return False
    return True


def _until(condition: Callable[[], bool], what: str, timeout_s: float = 15.0) -> float:
    """Seconds until ``condition()`` held (printed, not asserted); fails after ``timeout_s``."""
    began = time.monotonic()
    while not condition():
        assert time.monotonic() - began < timeout_s, f"{what}: not within {timeout_s} s"
        time.sleep(0.05)
    took = time.monotonic() - began
    print(f"{what}: {took:.2f} s")
    return took


def _pids(stack: RunningStack) -> dict[str, int]:
    return {r.service.name: r.pid for r in stack.stack.running()}


def test_keys_and_purges_without_a_restart(stack: RunningStack, second_router: str) -> None:
    pids = _pids(stack)
    assert {"router", "http-front", "semantic-cache", "prefix-cache"} <= set(pids)
    one, two = stack.target, second_router
    suffix = uuid.uuid4().hex[:6]
    t1, t2 = f"admin-one-{suffix}", f"admin-two-{suffix}"
    ns = f"admin-{suffix}"

    created = json.loads(_cli(stack, "--json", "keys", "create", t1, "--name", "it"))
    key1, key_id = created["apiKey"], created["key"]["id"]
    admin = AdminClient(one, admin_token=_admin_token(stack))
    key2 = admin.create_key(t2, "it").api_key
    listing = _cli(stack, "keys", "list", "--tenant", t1)
    assert key_id in listing and t1 in listing and key1 not in listing

    # used at once on the router that wrote it, soon on the other (it re-reads the file)
    assert _accepted(one, key1)
    _until(lambda: _accepted(two, key1), "a new key reached the second router")
    _until(lambda: _accepted(two, key2), "another new key reached the second router")

    # both tenants ask the same question twice: the second time an L1 hit
    for key in (key1, key2):
        assert _ask(one, key, QUESTION, ns).served_by != pb.LAYER_SEMANTIC_CACHE
        assert _ask(two, key, QUESTION, ns).served_by == pb.LAYER_SEMANTIC_CACHE

    # rotation: same id, new key; the old one refused on both routers, the new one accepted
    rotated = json.loads(_cli(stack, "--json", "keys", "rotate", key_id))
    new1 = rotated["apiKey"]
    assert rotated["key"]["id"] == key_id and new1 != key1
    assert not _accepted(one, key1) and _accepted(one, new1)
    _until(lambda: not _accepted(two, key1), "a rotated key refused by the second router")
    assert _accepted(two, new1)

    # purge t1's L1: t1's next question is a miss, t2's the same question still a hit
    purged = _cli(stack, "invalidate", t1, "--all")
    assert purged.startswith("dropped ") and int(purged.split()[1]) >= 1
    assert _ask(two, new1, QUESTION, ns).served_by != pb.LAYER_SEMANTIC_CACHE
    assert _ask(one, key2, QUESTION, ns).served_by == pb.LAYER_SEMANTIC_CACHE

    stats = {row.tenant: row for row in admin.stats().tenants}
    assert stats[t1].active_keys == 1 and stats[t1].model_requests >= 2
    assert stats[t2].l1_hits >= 2 and stats[t2].l1_entries >= 1 and stats[t2].l1_lookups >= 3
    billed = stats[t2]  # its model calls as prefix-cache billed them (not its L1 hits)
    assert billed.cost_nanos > 0 and billed.saved_nanos == billed.baseline_nanos - billed.cost_nanos
    table = _cli(stack, "stats", "--tenant", t2)
    assert t2 in table and "hit rate" in table

    # revocation: refused by both routers and by the HTTP front
    admin.revoke_key(key_id)
    assert not _accepted(one, new1)
    _until(lambda: not _accepted(two, new1), "a revoked key refused by the second router")
    front = f"http://{stack.addresses['http-front']}"
    _until(
        lambda: post_message(front, new1, "Still there?")[0] == 401,
        "a revoked key refused by the HTTP front",
    )
    assert post_message(front, key2, "Still there?")[0] == 200
    admin.close()
    assert _pids(stack) == pids, "a process was restarted"


def test_a_tenants_l1_turned_off_and_on(stack: RunningStack) -> None:
    suffix = uuid.uuid4().hex[:6]
    tenant, ns = f"admin-policy-{suffix}", f"policy-{suffix}"
    with AdminClient(stack.target, admin_token=_admin_token(stack)) as admin:
        key = admin.create_key(tenant).api_key
        policy = admin.set_policy(tenant, l1_enabled=False)
        assert not policy.l1_enabled
        for _ in range(2):  # neither served nor stored
            assert _ask(stack.target, key, QUESTION, ns).served_by != pb.LAYER_SEMANTIC_CACHE
        assert re.search(r"^L1 +off$", _cli(stack, "policy", "get", tenant), re.M)
        admin.set_policy(tenant, l1_enabled=True, default_ttl_s=3600)
        _ask(stack.target, key, QUESTION, ns)
        assert _ask(stack.target, key, QUESTION, ns).served_by == pb.LAYER_SEMANTIC_CACHE
        assert admin.policy(tenant).default_ttl_s == 3600


def test_admin_is_closed_to_api_keys_and_listed_by_reflection(stack: RunningStack) -> None:
    wrong = AdminClient(stack.target, admin_token=stack.keys["tenant-a"])
    with wrong, pytest.raises(CachemeshError) as caught:
        wrong.list_keys()
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert stack.keys["tenant-a"] not in str(caught.value)
    with grpc.insecure_channel(stack.target) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert {"cachemesh.v1.Gateway", "cachemesh.v1.Admin"} <= set(services)


def test_the_cli_needs_an_admin_token(tmp_path: Path, stack: RunningStack) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CACHEMESH_ADMIN_TOKEN")}
    done = subprocess.run(
        [sys.executable, "-m", "cachemesh.cli", "--target", stack.target, "admin", "stats"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2 and "CACHEMESH_ADMIN_TOKEN_FILE" in done.stderr


def test_a_tenant_differing_only_in_case_is_said_unknown(stack: RunningStack) -> None:
    """``policy set Tenant-B --l1 off`` printed "L1 off" while tenant-b stayed on, and
    ``invalidate Tenant-A --all`` "dropped 0 L1 entries of tenant Tenant-A"."""
    purged = _cli(stack, "invalidate", "Tenant-A", "--all", exits=1)
    assert "tenant Tenant-A is unknown" in purged and "did you mean tenant-a?" in purged
    refused = _cli(stack, "policy", "set", "Tenant-B", "--l1", "off", exits=1)
    assert "FAILED_PRECONDITION" in refused and "did you mean 'tenant-b'?" in refused
    assert re.search(r"^L1 +on$", _cli(stack, "policy", "get", "tenant-b"), re.M)
    tenant = f"admin-early-{uuid.uuid4().hex[:6]}"  # a policy before the tenant's first key
    early = _cli(stack, "policy", "set", tenant, "--l1", "off", "--new-tenant")
    assert f"tenant {tenant} was unknown" in early and re.search(r"^L1 +off$", early, re.M)
    assert "unknown" not in _cli(stack, "policy", "get", tenant)


def test_keys_and_stats_come_in_pages_with_the_billed_totals_of_each(
    stack: RunningStack,
) -> None:
    """Pages through the stack's router, and each page's totals from the real prefix-cache
    in one TotalsBatch call (its Redis pipeline): every row's totals come, none is unknown,
    and they are what prefix-cache's Totals says of each tenant."""
    _ask(stack.target, stack.keys["tenant-a"], f"What is paging? {uuid.uuid4().hex}", "pages")
    _until(lambda: stack.totals("tenant-a").requests > 0, "tenant-a's bill")
    with AdminClient(stack.target, admin_token=_admin_token(stack)) as admin:
        for i in range(3):
            admin.create_key(f"paged-{i}", name="pages")
        every = admin.list_keys(include_revoked=True)
        assert [k.id for k in admin.list_keys(include_revoked=True, page_size=1)] == [
            k.id for k in every
        ]
        paged = admin.stats(page_size=2)
        whole = admin.stats()
    tenants = [row.tenant for row in paged.tenants]
    assert tenants == sorted(set(tenants)) and {"paged-0", "paged-2", "tenant-a"} <= set(tenants)
    assert not paged.unavailable and not any(row.unavailable for row in paged.tenants)
    rows = {row.tenant: row for row in paged.tenants}
    assert rows["tenant-a"].model_requests > 0
    assert all(rows[f"paged-{i}"].model_requests == 0 for i in range(3))
    for tenant in ("tenant-a", "tenant-b"):  # prefix-cache's own, read after (only grows)
        assert rows[tenant].model_requests <= stack.totals(tenant).requests
    assert [row.tenant for row in whole.tenants] == tenants
