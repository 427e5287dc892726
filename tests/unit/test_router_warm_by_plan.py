"""The router's WARM commit names the Plan and sends the request only when the plan is gone."""

from __future__ import annotations

from typing import Any, cast

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.env import Env
from services.common.errors import Code
from services.common.model_overrides import model_table_from_env
from services.router.calls import Calls, warm_commit
from services.router.dependencies import CallFailed, Dependencies
from services.router.settings import RouterSettings

WARM = pc.CommitResponse(usage=pb.Usage(cache_read_input_tokens=2048))


class ScriptedCommit:
    def __init__(self, *replies: pc.CommitResponse | Code) -> None:
        self._replies = list(replies)
        self.sent: list[pc.CommitRequest] = []

    async def commit(self, request: pc.CommitRequest, deadline_s: float) -> pc.CommitResponse:
        sent = pc.CommitRequest()
        sent.CopyFrom(request)
        self.sent.append(sent)
        reply = self._replies.pop(0)
        if isinstance(reply, Code):
            raise CallFailed(reply, "gone")
        return reply


def calls(stub: ScriptedCommit) -> Calls:
    env = Env(
        {
            "MODEL_REPLICAS": "sim-small=127.0.0.1:1,sim-large=127.0.0.1:1",
            "CACHEMESH_API_KEYS_FILE": "/dev/null",
            "CACHEMESH_INTERNAL_TOKEN": "t" * 32,
        }
    )
    settings = RouterSettings.from_env(env, model_table_from_env(env))
    dependencies = Dependencies(
        semantic=cast(Any, None), prefix=cast(Any, stub), model=cast(Any, None), models={}
    )
    return Calls(dependencies, settings)


REQUEST = pb.CompleteRequest(
    model="sim-large",
    messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="Hello?")])],
)


ARRIVED_MS = 1_796_000_000_000


async def _warm(stub: ScriptedCommit, plan_id: str) -> pc.CommitResponse | None:
    warm = warm_commit("tenant-a", "r#1", "sim-large", "replica-1", 16, 2048, plan_id, False)
    return await calls(stub).commit_warm(warm, REQUEST, planned_at_ms=ARRIVED_MS)


async def test_a_held_plan_is_committed_without_the_request() -> None:
    stub = ScriptedCommit(WARM)
    assert await _warm(stub, "p1") == WARM
    [sent] = stub.sent
    assert sent.plan_id == "p1" and not sent.HasField("request")
    assert sent.max_read_tokens == 2048 and sent.kv_cached_tokens == 16


async def test_a_gone_plan_is_committed_again_with_the_request() -> None:
    stub = ScriptedCommit(Code.FAILED_PRECONDITION, WARM)
    assert await _warm(stub, "p1") == WARM
    first, second = stub.sent
    assert not first.HasField("request") and not first.HasField("planned_at_ms")
    assert second.request == REQUEST and second.request_id == "r#1"
    # settled as on arrival with the Plan's read (a restarted prefix-cache lost the warm
    # state the live judgement would read: before, the read was billed as a write)
    assert (second.max_read_tokens, second.planned_at_ms) == (2048, ARRIVED_MS)


async def test_without_a_plan_the_request_is_sent() -> None:
    stub = ScriptedCommit(WARM)
    assert await _warm(stub, "") == WARM
    assert stub.sent[0].request == REQUEST


async def test_prefix_cache_down_degrades_without_a_second_try() -> None:
    stub = ScriptedCommit(Code.UNAVAILABLE)
    assert await _warm(stub, "p1") is None
    assert len(stub.sent) == 1
