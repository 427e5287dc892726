"""The running stack as the integration tests see it, and the settings they start it with."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc

from cachemesh import Client
from cachemesh.envfile import read_env_file
from cachemesh.v1 import prefix_cache_pb2, prefix_cache_pb2_grpc
from services.tools.stack.lifecycle import Stack
from services.tools.stack.otlp_sink import OtlpSink, Span

ROOT = Path(__file__).resolve().parents[2]
_T = TypeVar("_T")


@contextmanager
def started_stack(
    run_dir: Path,
    extra: Mapping[str, str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    sink: OtlpSink | None = None,
) -> Iterator[tuple[Stack, OtlpSink]]:
    """A whole stack on free loopback ports (``Stack.on_free_ports``), exporting traces to a
    sink in this process, with ``extra`` settings over the tests' own; stopped (and the sink
    with it) on the way out. ``environ`` stands for the caller's environment (a setting there
    is still moved to the free ports, as MODEL_REPLICAS with replicas of its own)."""
    sink = sink or OtlpSink()
    sink.start()
    runner = Stack.on_free_ports(
        ROOT, run_dir, {**test_settings(sink), **(extra or {})}, environ=environ
    )
    try:
        runner.start(timeout_s=240)
        yield runner, sink
    finally:
        runner.stop()
        sink.stop()


@dataclass
class RunningStack:
    target: str
    addresses: dict[str, str]
    keys: dict[str, str]  # tenant -> API key
    internal_token: str
    sink: OtlpSink
    stack: Stack

    def internal_channel(self, service: str) -> grpc.Channel:
        return grpc.insecure_channel(self.addresses[service])

    def totals(self, tenant: str) -> prefix_cache_pb2.TotalsResponse:
        return prefix_totals(self.addresses["prefix-cache"], self.internal_token, tenant)


def pid_of(stack: Stack, service: str) -> int | None:
    """The pid of ``service``'s running process (None: not running)."""
    return {r.service.name: r.pid for r in stack.running()}.get(service)


@dataclass(frozen=True)
class Stoppable:
    """What a test that stops one process of a running stack needs: tenant a's client with one
    attempt (what is seen is the router's own degradation or hand-over, never the client's
    retry), the internal token (prefix-cache's totals) and the process's pid."""

    client: Client
    token: str
    pid: int

    def while_hung(self, call: Callable[[], _T]) -> _T:
        """``call()`` while the process is stopped (SIGSTOP: hung, its sockets still open),
        resumed after, whatever ``call`` raised."""
        os.kill(self.pid, signal.SIGSTOP)
        try:
            return call()
        finally:
            os.kill(self.pid, signal.SIGCONT)


def stoppable(stack: Stack, run_dir: Path, service: str, timeout_s: float) -> Stoppable:
    keys = read_env_file(run_dir / "demo-keys.env")
    pid = pid_of(stack, service)
    assert pid is not None, f"{service} is not running"
    client = Client(
        stack.router_address, api_key=keys["CACHEMESH_KEY_A"], max_attempts=1, timeout_s=timeout_s
    )
    return Stoppable(client, (run_dir / "internal-token").read_text().strip(), pid)


def prefix_totals(
    address: str, internal_token: str, tenant: str
) -> prefix_cache_pb2.TotalsResponse:
    """The tenant's billed totals, asked of prefix-cache with the internal credential."""
    with grpc.insecure_channel(address) as channel:
        stub = prefix_cache_pb2_grpc.PrefixCacheStub(channel)
        response: prefix_cache_pb2.TotalsResponse = stub.Totals(
            prefix_cache_pb2.TotalsRequest(tenant=tenant),
            metadata=(("x-cachemesh-internal", internal_token),),
            timeout=10,
        )
        return response


def test_settings(sink: OtlpSink) -> dict[str, str]:
    """What the integration tests change besides the ports: the simulator's sleeps, sim-large
    decoding speculatively with its draft (latency only), traces to ``sink``, a short grace
    period."""
    return {
        "SIM_TIME_SCALE": "0.02",
        "SIM_SPECULATIVE": "true",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "CACHEMESH_GRACE_S": "2",
    }


def router_spans(sink: OtlpSink, trace_id: str) -> tuple[Span, Span]:
    """The router's root span and its model-call span (``chat <model>``), once exported."""
    deadline = time.monotonic() + 20
    while True:
        spans = [s for s in sink.spans_of(trace_id) if s.service == "router"]
        roots = [s for s in spans if not s.parent_span_id]
        chats = [s for s in spans if s.name.startswith("chat ")]
        if roots and chats:
            return roots[0], chats[0]
        assert time.monotonic() < deadline, f"router spans not exported: {spans}"
        time.sleep(0.2)


_SERVER, _CLIENT = 2, 3  # OTLP's span kinds
_ERROR = 2  # OTLP's status code of a failed span


def _gateway_roots(spans: list[Span]) -> list[Span]:
    """The router's span of each tenant's Complete / StreamComplete call: the root of the
    request's trace (its parent, if any, is the caller's, outside the stack)."""
    return [
        s
        for s in spans
        if s.service == "router" and s.kind == _SERVER
        and s.attributes.get("rpc.service") == "cachemesh.v1.Gateway"
        and s.attributes.get("rpc.method") in ("Complete", "StreamComplete")
    ]  # fmt: skip


def _unfinished(spans: list[Span], root: Span, failed_reached: bool = True) -> list[str]:
    """What ``root``'s trace still lacks in the sink: a span whose parent (in the stack) has
    not arrived, or a gRPC call (its CLIENT span) whose callee's SERVER span has not; a failed
    call's callee only while ``failed_reached`` (a call that failed may never have reached its
    callee: a deadline passed in the caller, a connection refused)."""
    trace = [s for s in spans if s.trace_id == root.trace_id]
    ids = {s.span_id for s in trace}
    missing = [
        f"{s.service} {s.name}'s parent" for s in trace if s is not root and s.parent_span_id
        and s.parent_span_id not in ids
    ]  # fmt: skip
    served = {s.parent_span_id for s in trace if s.kind == _SERVER}
    missing += [f"the callee's span of {s.service} {s.name}" for s in trace
                if s.kind == _CLIENT and s.attributes.get("rpc.system") == "grpc"
                and s.span_id not in served
                and (failed_reached or s.status_code != _ERROR)]  # fmt: skip
    return missing


def settled_spans(
    sink: OtlpSink,
    before: set[str],
    requests: int,
    direct: Mapping[str, str] | None = None,
) -> list[Span]:
    """Every span, once the ``requests`` Gateway calls made since the spans ``before`` have
    each reached the sink whole: the router's root span (which ends only after the bills that
    come after its reply, ``rpc_tracing.end_after``) and, for each gRPC call a span of the
    trace made, the callee's span, from every service the request crossed; and the span of
    each call made straight to a service (``direct``: its trace id -> the service). Taken
    right after the last reply (or after a sleep), a span still in a service's batch
    exporter, or one ending after the reply, goes unchecked: what a test that looks for what
    must not be in any span (a secret, a prompt) reads."""
    start = time.monotonic()
    deadline = start + 60
    while True:
        spans = sink.all_spans()
        roots = [s for s in _gateway_roots(spans) if s.span_id not in before]
        # a failed call's callee span is waited for 20 s, then no longer: under load a call
        # can fail in its caller before it reaches its callee, which then has no span
        failed_reached = time.monotonic() < start + 20
        lacking = {root.trace_id: _unfinished(spans, root, failed_reached) for root in roots}
        lacking = {trace: what for trace, what in lacking.items() if what}
        arrived = {(s.trace_id, s.service) for s in spans if s.kind == _SERVER}
        lacking |= {t: [f"{service}'s span"] for t, service in (direct or {}).items()
                    if (t, service) not in arrived}  # fmt: skip
        if len(roots) >= requests and not lacking:
            return spans
        assert time.monotonic() < deadline, (
            f"{len(roots)} of {requests} requests' root spans exported, traces lacking: {lacking}"
        )
        time.sleep(0.1)
