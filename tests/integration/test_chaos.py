"""Chaos: under load, each process of the stack is killed with SIGKILL in turn.

A whole supervised stack (the same runner as ``make up``: its supervisor, its own Redis, data
directories) serves 8 requests in flight from the client library; an L1 writer stores entries
straight into semantic-cache and remembers the acknowledged ones. Each process is killed in
turn (model replicas first, then prefix-cache, Redis, semantic-cache, the router, the HTTP
front), and the next kill waits until the stack is whole again. Checked:

- every request is answered: by the client's own retries (gRPC's retry policy, wait for
  ready), or when those ran out with a retryable status, by calling again with the same
  request_id; no request ends in any other error;
- every acknowledged L1 entry is served after semantic-cache's restart;
- no committed bill is lost: a tenant's totals never go down across the kills of prefix-cache
  and Redis, and at the end (the router's billing outbox drained) they hold at least every
  answer the model served, the ones served while prefix-cache was down included;
- each process is back to SERVING by itself (the supervisor), recorded with its time.

The counts and recovery times are printed and written to ``chaos-report.json`` in the run dir.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from cachemesh import CachemeshError, Client, build_request
from cachemesh.envfile import read_env_file
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import semantic_cache_pb2 as sc
from cachemesh.v1 import semantic_cache_pb2_grpc as sc_grpc
from services.common.auth import internal_metadata
from services.tools.stack.health import SERVING
from services.tools.stack.lifecycle import Stack
from services.tools.stack.redis_process import REDIS
from services.tools.stack.service_table import SERVICES
from tests.integration.harness import pid_of, prefix_totals, started_stack

pytestmark = pytest.mark.integration

KILL_ORDER = ("model", "model-2", "prefix-cache", "redis", "semantic-cache", "router", "http-front")
IN_FLIGHT = 8
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
CALLER_RETRIES = 10
TENANT = "tenant-a"


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    answered: int = 0
    answered_after_caller_retry: int = 0
    caller_retries: int = 0
    lost: list[str] = field(default_factory=list)
    by_layer: Counter[str] = field(default_factory=Counter)
    model_served: int = 0
    model_cost_nanos: int = 0
    estimated: int = 0


def _load(client: Client, tally: Tally, stop: threading.Event, worker: int) -> None:
    n = 0
    while not stop.is_set():
        n += 1
        repeat = n % 4 == 0  # a question asked before: an L1 hit when it was stored
        question = f"chaos question {worker}-{(n // 4) if repeat else n}: how do I reset it?"
        model = "sim-large" if n % 2 else "auto"
        request = build_request(question, model=model, max_tokens=40, namespace="chaos")
        request.request_id = uuid.uuid4().hex
        for attempt in range(CALLER_RETRIES + 1):
            try:
                response = client.complete(request)
            except CachemeshError as error:
                if error.code in RETRYABLE and attempt < CALLER_RETRIES:
                    with tally.lock:
                        tally.caller_retries += 1
                    time.sleep(0.5)
                    continue
                with tally.lock:
                    tally.lost.append(f"{request.request_id}: {error}")
                break
            with tally.lock:
                tally.answered += 1
                tally.answered_after_caller_retry += attempt > 0
                tally.by_layer[pb.Layer.Name(response.served_by)] += 1
                if response.served_by != pb.LAYER_SEMANTIC_CACHE:
                    tally.model_served += 1
                    tally.model_cost_nanos += response.cost.cost_nanos
                    tally.estimated += response.cost.estimated
            break


def _l1_request(i: int) -> pb.CompleteRequest:
    return build_request(f"chaos stored fact number {i}?", model="sim-small", namespace="l1")


def _l1_writer(address: str, token: str, acked: list[int], stop: threading.Event) -> None:
    metadata = internal_metadata(token)
    with grpc.insecure_channel(address) as channel:
        stub = sc_grpc.SemanticCacheStub(channel)
        i = 0
        while not stop.is_set():
            i += 1
            answer = sc.CachedAnswer(
                content=[pb.ContentBlock(text=f"fact {i}")],
                model="sim-small",
                stop_reason="end_turn",
                output_tokens=2,
            )
            store = sc.StoreRequest(tenant="chaos-l1", request=_l1_request(i), answer=answer)
            try:
                reply = stub.Store(store, metadata=metadata, timeout=5)
            except grpc.RpcError:
                time.sleep(0.1)
                continue
            if reply.stored:
                acked.append(i)
            # a write every 0.2 s keeps one in flight at the kill often enough; each entry
            # acknowledged is looked up after it (an embedding each: the test's time)
            time.sleep(0.2)


def _wait_back(stack: Stack, name: str, old_pid: int, timeout_s: float = 60.0) -> float:
    """Seconds from the kill until a new process of ``name`` is SERVING."""
    spec = REDIS if name == "redis" else next(s for s in SERVICES if s.name == name)
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        pid = pid_of(stack, name)
        # the stack's health check: Redis's with its password
        if pid is not None and pid != old_pid and stack.health(spec, 0.5) == SERVING:
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"{name} not SERVING again {timeout_s:.0f}s after SIGKILL")


def _cost(stack: Stack, token: str) -> tuple[int, int]:
    """The tenant's billed totals; UNAVAILABLE (prefix-cache's first call on a stale Redis
    connection after Redis came back) is retried, as a client would, for up to 10 s."""
    deadline = time.monotonic() + 10
    while True:
        try:
            totals = prefix_totals(stack.addresses["prefix-cache"], token, TENANT)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
            continue
        return totals.requests, totals.cost_nanos


def test_every_process_killed_in_turn_under_load(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    extra = {"SIM_TIME_SCALE": "0.1", "OTEL_TRACES_EXPORTER": "none", "CACHEMESH_GRACE_S": "1"}
    with started_stack(run_dir, extra) as (stack, _sink):
        keys = read_env_file(run_dir / "demo-keys.env")
        token = (run_dir / "internal-token").read_text().strip()
        tally, stop = Tally(), threading.Event()
        acked: list[int] = []
        client = Client(stack.router_address, api_key=keys["CACHEMESH_KEY_A"], timeout_s=30)
        threads = [
            threading.Thread(target=_load, args=(client, tally, stop, w), daemon=True)
            for w in range(IN_FLIGHT)
        ]
        threads.append(
            threading.Thread(
                target=_l1_writer,
                args=(stack.addresses["semantic-cache"], token, acked, stop),
                daemon=True,
            )
        )
        recovery: dict[str, float] = {}
        cycle_s: dict[str, float] = {}  # kill to checked, per process
        totals_kept: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {}
        began = time.monotonic()
        for thread in threads:
            thread.start()
        try:
            time.sleep(1.0)
            for name in KILL_ORDER:
                cycle_began = time.monotonic()
                before = _cost(stack, token) if name in ("prefix-cache", "redis") else None
                acked_before = list(acked) if name == "semantic-cache" else []
                pid = pid_of(stack, name)
                assert pid is not None, f"{name} is not running"
                os.kill(pid, signal.SIGKILL)
                recovery[name] = _wait_back(stack, name, pid)
                if before is not None:
                    after = _cost(stack, token)
                    totals_kept[name] = (before, after)
                    assert after >= before, f"{name}'s kill lost committed bills"
                if name == "semantic-cache":
                    _assert_served(stack, token, acked_before)
                cycle_s[name] = time.monotonic() - cycle_began
                time.sleep(0.5)  # load on the whole stack before the next kill
        finally:
            stop.set()
            stopping = time.monotonic()
            for thread in threads:
                thread.join(timeout=60)
            client.close()
        load_s = time.monotonic() - began
        join_s = time.monotonic() - stopping

        outbox = run_dir / "data" / "router" / "billing-outbox.jsonl"
        deadline = time.monotonic() + 30
        while outbox.exists() and outbox.stat().st_size and time.monotonic() < deadline:
            time.sleep(0.2)
        billed_requests, billed_nanos = _cost(stack, token)
        state = json.loads((run_dir / "supervisor-state.json").read_text())
        report = {
            "load_s": round(load_s, 1),
            "answered": tally.answered,
            "answered_after_caller_retry": tally.answered_after_caller_retry,
            "caller_retries": tally.caller_retries,
            "lost": len(tally.lost),
            "by_layer": dict(tally.by_layer),
            "model_served": tally.model_served,
            "served_while_prefix_cache_down": tally.estimated,
            "billed_requests": billed_requests,
            "billed_nanos": billed_nanos,
            "answered_model_nanos": tally.model_cost_nanos,
            "l1_acknowledged_before_kill": len(acked),
            "recovery_s": {k: round(v, 2) for k, v in recovery.items()},
            "cycle_s": {k: round(v, 2) for k, v in cycle_s.items()},
            "join_s": round(join_s, 2),
            "totals_across_kills": {k: [list(a), list(b)] for k, (a, b) in totals_kept.items()},
            "restarts": {k: v["restarts"] for k, v in state.items()},
            "replica_retries": _count(run_dir / "logs" / "router.log", "retrying on another"),
        }
        (run_dir / "chaos-report.json").write_text(json.dumps(report, indent=2))
        print("chaos report:", json.dumps(report, indent=2))

        assert tally.lost == []
        assert tally.answered > 100
        assert not (outbox.exists() and outbox.stat().st_size), "billing outbox not drained"
        assert billed_requests >= tally.model_served
        assert billed_nanos >= tally.model_cost_nanos
        assert set(recovery) == set(KILL_ORDER)
        assert all(v["restarts"] == 1 and v["pid"] for k, v in state.items()), state
        assert all(health == SERVING for _, health in stack.status().values())


def _assert_served(stack: Stack, token: str, acked: list[int]) -> None:
    """Every entry semantic-cache acknowledged before its kill is served after it."""
    assert acked, "no L1 entry was acknowledged before the kill"
    metadata = internal_metadata(token)
    with grpc.insecure_channel(stack.addresses["semantic-cache"]) as channel:
        stub = sc_grpc.SemanticCacheStub(channel)
        missing = []
        for i in acked:
            lookup = sc.LookupRequest(tenant="chaos-l1", request=_l1_request(i))
            # SERVING by the stack's probe (a channel of its own): this channel may still be
            # backing off from a refused connect while the service restarted
            reply = stub.Lookup(lookup, metadata=metadata, timeout=10, wait_for_ready=True)
            if not (reply.hit and reply.answer.content[0].text == f"fact {i}"):
                missing.append(i)
    assert missing == [], f"{len(missing)} of {len(acked)} acknowledged L1 entries lost"


def _count(path: Path, needle: str) -> int:
    try:
        return path.read_text(errors="replace").count(needle)
    except FileNotFoundError:
        return 0
