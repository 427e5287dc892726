"""A request_id is answered and billed once whichever router gets it, marked as a retry or not.

Real processes: three routers beside the session's stack (its caches, prefix-cache, replicas),
routers one and two on one real Redis answer ledger, three on none, each with the session's
replicas and, for sim-small, a replica of its own at four times the simulator's real speed
(an answer takes seconds). The calls go through the generated stub with the tenant's key
alone: no ``cachemesh-retry`` mark, as grpcurl or another language's stub sends them, which
the proto's contract covers all the same ("a retry with the same id is answered and billed
once"). The model calls are counted by prefix-cache's totals (one bill each).

A review measured, on main: an unmarked repeat on the other router ran the model and billed
again (595,000 nanos twice); two at once made 2 model calls; and two at once through L1 made 2
where two different ids make 1 (the second took the first's single-flight lease over).
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager

import grpc
import pytest

from cachemesh import build_request
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import gateway_pb2_grpc
from services.common.auth import hash_key, new_api_key
from services.tools.stack.health import SERVING, probe
from tests.integration.extra_processes import loopback, process, service_env
from tests.integration.harness import RunningStack
from tests.redis_server import redis_server

pytestmark = pytest.mark.integration

TENANT = "unmarked-request-id"
_BILLED = (pb.LAYER_MODEL, pb.LAYER_PREFIX_CACHE)
Routers = dict[str, str]  # name -> address


@pytest.fixture(scope="module")
def key_and_routers(
    stack: RunningStack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Routers]]:
    """The tenant's key (a key file of this module's: its bill is this module's alone) and
    routers one and two (one ledger), three (none)."""
    work = tmp_path_factory.mktemp("unmarked-request-id")
    key = new_api_key()
    keys_file = work / "api-keys"
    keys_file.write_text(f"{TENANT}:{hash_key(key)}\n")
    slow = loopback()
    slow_env = service_env(stack, "model", {"MODEL_LISTEN": slow, "SIM_TIME_SCALE": "4"})
    routed = service_env(stack, "router", {})["MODEL_REPLICAS"].split(",")
    replicas = ",".join(
        [r for r in routed if not r.startswith("sim-small=")] + [f"sim-small={slow}"]
    )
    routers = {name: loopback() for name in ("one", "two", "three")}
    with (
        redis_server(work) as ledger,
        process("services.model", slow_env, work / "model.log", lambda: probe(slow) == SERVING),
    ):

        def router(
            name: str, ledger_url: str | None
        ) -> AbstractContextManager[subprocess.Popen[bytes]]:
            env = service_env(
                stack,
                "router",
                {
                    "ROUTER_LISTEN": routers[name],
                    "CACHEMESH_API_KEYS_FILE": str(keys_file),
                    "MODEL_REPLICAS": replicas,
                },
            )
            env.pop("ROUTER_ANSWERS_REDIS_URL", None)
            if ledger_url is not None:
                env["ROUTER_ANSWERS_REDIS_URL"] = ledger_url
            address = routers[name]
            return process(
                "services.router", env, work / f"{name}.log", lambda: probe(address) == SERVING
            )

        with router("one", ledger), router("two", ledger), router("three", None):
            yield key, routers


def _request(text: str, *, model: str = "sim-large", bypass: bool = True) -> pb.CompleteRequest:
    return build_request(
        f"{text} ({uuid.uuid4().hex[:8]})",
        model=model,
        max_tokens=512,
        semantic=pb.SEMANTIC_MODE_BYPASS if bypass else pb.SEMANTIC_MODE_UNSPECIFIED,
        namespace=uuid.uuid4().hex[:12],  # no paraphrase of another test's question hits
        request_id=uuid.uuid4().hex,
    )


def _auth(key: str) -> tuple[tuple[str, str | bytes], ...]:
    return (("authorization", f"Bearer {key}"),)


def _complete(target: str, key: str, request: pb.CompleteRequest) -> pb.CompleteResponse:
    """One unmarked call, as grpcurl makes it: the key alone, one attempt."""
    with grpc.insecure_channel(target) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        reply: pb.CompleteResponse = stub.Complete(request, metadata=_auth(key), timeout=60)
        return reply


def _stream(target: str, key: str, request: pb.CompleteRequest) -> pb.CompleteResponse:
    with grpc.insecure_channel(target) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        chunks = list(stub.StreamComplete(request, metadata=_auth(key), timeout=60))
    assert chunks[-1].WhichOneof("part") == "end"
    return chunks[-1].end


def _text(answer: pb.CompleteResponse) -> str:
    return "".join(block.text for block in answer.content)


@pytest.mark.parametrize("repeat", [_complete, _stream], ids=["complete", "stream"])
def test_an_unmarked_repeat_on_another_router_is_replayed_and_billed_once(
    stack: RunningStack,
    key_and_routers: tuple[str, Routers],
    repeat: Callable[[str, str, pb.CompleteRequest], pb.CompleteResponse],
) -> None:
    key, routers = key_and_routers
    request = _request("Why do retries need request ids?")
    before = stack.totals(TENANT)
    first = _complete(routers["one"], key, request)
    assert first.served_by in _BILLED and first.cost.cost_nanos > 0 and not first.replayed
    billed = stack.totals(TENANT)
    assert billed.requests == before.requests + 1
    again = repeat(routers["two"], key, request)  # the same request_id, sent again, unmarked
    after = stack.totals(TENANT)
    assert (after.requests, after.cost_nanos) == (billed.requests, billed.cost_nanos), (
        "the repeat was billed a second time"
    )
    assert again.replayed and again.trace_id == first.trace_id and _text(again) == _text(first)
    assert again.cost.cost_nanos == first.cost.cost_nanos  # what the first call was billed


def test_unmarked_duplicates_at_once_on_two_routers_make_one_model_call(
    stack: RunningStack, key_and_routers: tuple[str, Routers]
) -> None:
    """L1 bypassed: only the ledger can spare the second call, which waits for the first's
    answer on the other router (or finds it recorded)."""
    key, routers = key_and_routers
    request = _request("Describe exactly-once delivery.", model="sim-small")
    before = stack.totals(TENANT).requests
    with ThreadPoolExecutor(2) as pool:
        calls = [pool.submit(_complete, routers[name], key, request) for name in ("one", "two")]
        answers = [call.result() for call in calls]
    assert stack.totals(TENANT).requests == before + 1, "two model calls for one request_id"
    assert sorted(a.replayed for a in answers) == [False, True]
    assert _text(answers[0]) == _text(answers[1])


@pytest.mark.parametrize("second", ["two", "three"], ids=["ledger", "no-ledger"])
def test_an_unmarked_duplicate_through_l1_waits_on_the_first_calls_lease(
    stack: RunningStack, key_and_routers: tuple[str, Routers], second: str
) -> None:
    """The first call's model call is on (its stream has begun: it holds L1's single-flight
    lease) when its duplicate, the same request_id unmarked, reaches another router: the
    duplicate waits on that lease, as an identical request with another id does, and is
    served the first call's answer from L1, not a second model call. Router three has no
    ledger: L1 alone must spare the call."""
    key, routers = key_and_routers
    request = _request(
        "How long are backups of my workspace kept?", model="sim-small", bypass=False
    )
    before = stack.totals(TENANT).requests
    with (
        grpc.insecure_channel(routers["one"]) as channel,
        ThreadPoolExecutor(1) as pool,
    ):
        stub = gateway_pb2_grpc.GatewayStub(channel)
        stream = stub.StreamComplete(request, metadata=_auth(key), timeout=60)
        chunks = [next(stream)]  # the model's first token: L1's lease is the first call's
        assert chunks[0].WhichOneof("part") == "start"
        duplicate = pool.submit(_complete, routers[second], key, request)
        chunks.extend(stream)
        first = chunks[-1].end
        again = duplicate.result()
    assert first.served_by in _BILLED and first.stop_reason == "end_turn"
    assert stack.totals(TENANT).requests == before + 1, "two model calls for one request_id"
    assert again.served_by == pb.LAYER_SEMANTIC_CACHE and _text(again) == _text(first)
