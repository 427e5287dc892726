"""The router's L1 lookup waits once more, longer, when an identical model call is in flight."""

from __future__ import annotations

from typing import Any, cast

import pytest

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import semantic_cache_pb2 as sc
from services.common.env import Env
from services.common.errors import Code
from services.common.models import model_table_from_env
from services.router.calls import Calls
from services.router.dependencies import CallFailed, Dependencies
from services.router.settings import RouterSettings

REPLICAS = "sim-small=127.0.0.1:1,sim-large=127.0.0.1:1"


class ScriptedLookup:
    """Answers Lookup from a script, recording each call's deadline."""

    def __init__(self, *replies: sc.LookupResponse | Code) -> None:
        self._replies = list(replies)
        self.timeouts: list[float] = []

    async def lookup(self, request: sc.LookupRequest, deadline_s: float) -> sc.LookupResponse:
        self.timeouts.append(deadline_s)
        reply = self._replies.pop(0)
        if isinstance(reply, Code):
            raise CallFailed(reply, "late")
        return reply


def calls(stub: ScriptedLookup, lease_wait_s: str) -> Calls:
    env = Env(
        {
            "MODEL_REPLICAS": REPLICAS,
            "CACHEMESH_API_KEYS_FILE": "/dev/null",
            "CACHEMESH_INTERNAL_TOKEN": "t",
            "ROUTER_SEMANTIC_TIMEOUT_S": "2",
            "ROUTER_SEMANTIC_LEASE_WAIT_S": lease_wait_s,
        }
    )
    settings = RouterSettings.from_env(env, model_table_from_env(env))
    dependencies = Dependencies(
        semantic=cast(Any, stub), prefix=cast(Any, None), model=cast(Any, None), models={}
    )
    return Calls(dependencies, settings)


HIT = sc.LookupResponse(hit=True, waited=True)
PENDING = sc.LookupResponse(pending=True)


async def test_a_pending_miss_looks_again_with_the_lease_wait_as_deadline() -> None:
    stub = ScriptedLookup(PENDING, HIT)
    reply = await calls(stub, "30").lookup("tenant-a", pb.CompleteRequest())
    assert reply is not None and reply.hit and reply.waited
    assert stub.timeouts == [2.0, 30.0]


@pytest.mark.parametrize("first", [sc.LookupResponse(), sc.LookupResponse(leader=True), HIT])
async def test_a_miss_without_a_lease_in_flight_or_a_hit_is_looked_up_once(
    first: sc.LookupResponse,
) -> None:
    stub = ScriptedLookup(first)
    assert await calls(stub, "30").lookup("tenant-a", pb.CompleteRequest()) == first
    assert stub.timeouts == [2.0]


async def test_lease_wait_zero_never_waits_longer() -> None:
    stub = ScriptedLookup(PENDING)
    assert await calls(stub, "0").lookup("tenant-a", pb.CompleteRequest()) == PENDING
    assert stub.timeouts == [2.0]


async def test_a_second_lookup_that_fails_degrades_to_the_first_miss() -> None:
    stub = ScriptedLookup(PENDING, Code.DEADLINE_EXCEEDED)
    assert await calls(stub, "30").lookup("tenant-a", pb.CompleteRequest()) == PENDING
    assert stub.timeouts == [2.0, 30.0]
