"""The Python client's own retries on real processes: two routers beside the session's stack
(its caches and replicas) sharing one real Redis answer ledger, as N routers behind a balancer.

A caller that resends a request with the ``request_id`` its error named (the documented
recovery) may reach the other router: the client marks a call with the caller's own id as a
possible retry, so that router answers it from the ledger, billed once, for ``Client`` and
``AsyncClient``, ``complete`` and ``stream``. The first call, marked too (the client cannot
tell it from a retry), is served normally: its id is in no ledger yet.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import cast

import pytest

from cachemesh import AsyncClient, Client, build_request
from cachemesh.v1 import gateway_pb2 as pb
from services.common.auth import hash_key, new_api_key
from services.router.answer_ledger import ledger_key
from services.tools.stack.health import SERVING, probe
from tests.integration.extra_processes import Started, loopback, process, processes, service_env
from tests.integration.harness import RunningStack
from tests.redis_server import redis_server, sync_client_of

pytestmark = pytest.mark.integration

TENANT = "client-retry"


@pytest.fixture(scope="module")
def key_and_routers(
    stack: RunningStack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str, str]]:
    """A tenant's key and two routers on one answer ledger (their own key file: this tenant's
    bill is this module's alone)."""
    work = tmp_path_factory.mktemp("client-retry")
    key = new_api_key()
    keys_file = work / "api-keys"
    keys_file.write_text(f"{TENANT}:{hash_key(key)}\n")
    with redis_server(work) as url:
        one, two = loopback(), loopback()
        routers = [
            _router(stack, work, name, at, keys_file, url)
            for name, at in (("one", one), ("two", two))
        ]
        with processes(routers):  # side by side: they load their models at once
            yield key, one, two


def _router(
    stack: RunningStack,
    work: Path,
    name: str,
    address: str,
    keys_file: Path,
    ledger: str,
    extra: dict[str, str] | None = None,
) -> Started:
    env = service_env(
        stack,
        "router",
        {
            "ROUTER_LISTEN": address,
            "CACHEMESH_API_KEYS_FILE": str(keys_file),
            "ROUTER_ANSWERS_REDIS_URL": ledger,
            **(extra or {}),
        },
    )
    return "services.router", env, work / f"{name}.log", lambda: probe(address) == SERVING


def _request() -> pb.CompleteRequest:
    """A caller's request with its own id; L1 bypassed, so only the ledger can spare a call."""
    return build_request(
        f"Why do retries need idempotency keys? ({uuid.uuid4().hex[:8]})",
        model="sim-small",
        max_tokens=16,
        semantic=pb.SEMANTIC_MODE_BYPASS,
        request_id=uuid.uuid4().hex,
    )


def _last(chunks: list[pb.CompleteChunk]) -> pb.CompleteResponse:
    assert chunks[-1].WhichOneof("part") == "end"
    return chunks[-1].end


def _sync_complete(target: str, key: str, request: pb.CompleteRequest) -> pb.CompleteResponse:
    with Client(target, api_key=key, timeout_s=60) as client:
        return client.complete(request)


def _sync_stream(target: str, key: str, request: pb.CompleteRequest) -> pb.CompleteResponse:
    with Client(target, api_key=key, timeout_s=60) as client:
        return _last(list(client.stream(request)))


def _aio_complete(target: str, key: str, request: pb.CompleteRequest) -> pb.CompleteResponse:
    async def call() -> pb.CompleteResponse:
        async with AsyncClient(target, api_key=key, timeout_s=60) as client:
            return await client.complete(request)

    return asyncio.run(call())


def _aio_stream(target: str, key: str, request: pb.CompleteRequest) -> pb.CompleteResponse:
    async def call() -> pb.CompleteResponse:
        async with AsyncClient(target, api_key=key, timeout_s=60) as client:
            return _last([chunk async for chunk in client.stream(request)])

    return asyncio.run(call())


Call = Callable[[str, str, pb.CompleteRequest], pb.CompleteResponse]


@pytest.mark.parametrize(
    "retry",
    [_sync_complete, _sync_stream, _aio_complete, _aio_stream],
    ids=["sync-complete", "sync-stream", "aio-complete", "aio-stream"],
)
def test_a_callers_retry_on_another_router_is_answered_and_billed_once(
    stack: RunningStack, key_and_routers: tuple[str, str, str], retry: Call
) -> None:
    key, one, two = key_and_routers
    request = _request()
    before = stack.totals(TENANT).requests
    first = _sync_complete(one, key, request)  # answered and billed; say its reply was lost
    assert first.served_by in (pb.LAYER_MODEL, pb.LAYER_PREFIX_CACHE) and first.content
    assert stack.totals(TENANT).requests == before + 1
    again = retry(two, key, request)  # the caller's retry with the same request_id
    assert stack.totals(TENANT).requests == before + 1, "the retry was billed a second time"
    assert again.trace_id == first.trace_id and again.content == first.content


def _in_flight(metrics: str) -> float:
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    found = re.search(r"^cachemesh_router_requests_in_flight (\S+)$", text, re.M)
    assert found is not None, "no in-flight gauge"
    return float(found.group(1))


def _until(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not {what} within {timeout_s:.0f} s"
        time.sleep(0.01)


def test_a_retry_on_another_router_while_the_first_call_runs_is_billed_once(
    stack: RunningStack, tmp_path: Path
) -> None:
    """The first call (marked, as the client marks every call with the caller's id) is still
    running on router one, held there (SIGSTOP) so that it surely is, when the caller's retry
    reaches router two. Both routers called the model and billed it (two bills, as a review
    measured: $0.521 instead of $0.259); now router two waits for router one's answer."""
    key = new_api_key()
    keys_file = tmp_path / "api-keys"
    keys_file.write_text(f"{TENANT}:{hash_key(key)}\n")
    replica = loopback()  # sim-small at its real speed: a long prompt takes seconds
    replica_env = service_env(stack, "model", {"MODEL_LISTEN": replica, "SIM_TIME_SCALE": "1"})
    routed = service_env(stack, "router", {})["MODEL_REPLICAS"].split(",")
    replicas = ",".join(
        [r for r in routed if not r.startswith("sim-small=")] + [f"sim-small={replica}"]
    )
    one, two = loopback(), loopback()
    metrics = {one: loopback(), two: loopback()}
    with (
        redis_server(tmp_path) as url,
        process(
            "services.model", replica_env, tmp_path / "model.log", lambda: probe(replica) == SERVING
        ),
        processes(
            [
                _router(
                    stack,
                    tmp_path,
                    name,
                    at,
                    keys_file,
                    url,
                    {"MODEL_REPLICAS": replicas, "ROUTER_METRICS_LISTEN": metrics[at]},
                )
                for name, at in (("one", one), ("two", two))
            ]
        ) as (first_router, _),
        ThreadPoolExecutor(2) as pool,
    ):
        request = _request()
        request.system.add(text=f"{request.request_id} You are helpful. " * 4000)
        before = stack.totals(TENANT).requests
        redis = sync_client_of(url)

        def call(target: str) -> pb.CompleteResponse:
            with Client(target, api_key=key, timeout_s=120, max_attempts=1) as client:
                return client.complete(request)

        first = pool.submit(call, one)
        _until(lambda: _in_flight(metrics[one]) == 1, "in flight on router one")
        os.kill(first_router.pid, signal.SIGSTOP)
        try:
            held = cast(bytes | None, redis.get(ledger_key(TENANT, request.request_id)))
            assert held is None or held.startswith(b"?"), "the first call ended too soon"
            again = pool.submit(call, two)  # the caller's retry, on the other router
            _until(lambda: again.done() or _in_flight(metrics[two]) == 1, "retried")
        finally:
            os.kill(first_router.pid, signal.SIGCONT)
        answers = first.result(), again.result()
        redis.close()
        assert answers[0].trace_id == answers[1].trace_id
        assert answers[0].content == answers[1].content
        assert stack.totals(TENANT).requests == before + 1, "the retry was billed a second time"
