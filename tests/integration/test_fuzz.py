"""Fuzzing the Gateway on the wire: generated requests and mutated bytes, then a health check.

Hypothesis builds CompleteRequests from every field's range and beyond it (unknown enum
values, empty and oversized strings, NaN temperatures, tool blocks out of place); the byte
mutations flip, cut and splice a valid request's serialization. Every answer must be a status
a client can act on (OK, INVALID_ARGUMENT, RESOURCE_EXHAUSTED), never UNKNOWN or INTERNAL;
afterwards every service still reports SERVING and no process has grown by more than a
bounded amount over the run (the figures are printed for the closing note).
"""

from __future__ import annotations

import random
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cachemesh import build_request
from cachemesh.v1 import gateway_pb2 as pb
from tests.integration.harness import RunningStack

pytestmark = pytest.mark.integration

_ACCEPTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,  # an unknown model
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
_GENERATED = 800
_MUTATED = 1600
_GROWTH_MB = 80  # per process over the run; the caches may keep what valid requests stored

_text = st.text(max_size=40) | st.sampled_from(["", " ", "x" * 5000, "\u0000", "é" * 30])
_ints = st.integers(min_value=-(2**31), max_value=2**31 - 1) | st.sampled_from([0, 1, 64])
_block = st.one_of(
    st.builds(pb.ContentBlock, text=_text),
    st.builds(
        pb.ContentBlock,
        tool_use=st.builds(pb.ToolUse, id=_text, name=_text, input_json=_text),
    ),
    st.builds(
        pb.ContentBlock,
        tool_result=st.builds(pb.ToolResult, tool_use_id=_text, content=_text),
    ),
)
_message = st.builds(
    pb.Message,
    role=st.integers(min_value=0, max_value=5),
    content=st.lists(_block, max_size=3),
)
_request = st.builds(
    pb.CompleteRequest,
    model=st.sampled_from(["sim-small", "sim-large", "auto", "", "gpt-17", "m" * 300]),
    messages=st.lists(_message, max_size=4),
    system=st.lists(_block, max_size=2),
    tools=st.lists(st.builds(pb.Tool, name=_text, input_schema_json=_text), max_size=2),
    max_tokens=st.sampled_from([0, -5, 1, 16, 64, 10**9]),
    temperature=st.floats(allow_nan=True, allow_infinity=True),
    request_id=_text,
    cache=st.builds(
        pb.CacheOptions,
        namespace=_text,
        semantic=st.integers(min_value=0, max_value=7),
        threshold=st.floats(allow_nan=True),
    ),
)


def _raw_complete(channel: grpc.Channel) -> grpc.UnaryUnaryMultiCallable[bytes, bytes]:
    return channel.unary_unary(
        "/cachemesh.v1.Gateway/Complete",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )


def _status(
    call: grpc.UnaryUnaryMultiCallable[bytes, bytes], body: bytes, key: str
) -> grpc.StatusCode:
    try:
        call(body, metadata=(("authorization", f"Bearer {key}"),), timeout=30)
    except grpc.RpcError as exc:
        code = exc.code()
        assert code in _ACCEPTED, f"{code}: {exc.details()}"
        assert len(exc.details() or "") < 1000  # nothing echoed unbounded
        return code
    return grpc.StatusCode.OK


def _mutations(seed: bytes, count: int) -> list[bytes]:
    rng = random.Random(20261202)
    out: list[bytes] = []
    for _ in range(count):
        data = bytearray(seed)
        for _ in range(rng.randint(1, 6)):
            kind = rng.randrange(4)
            at = rng.randrange(len(data)) if data else 0
            if kind == 0 and data:
                data[at] ^= 1 << rng.randrange(8)  # flip a bit
            elif kind == 1:
                data = data[:at]  # cut
            elif kind == 2:
                data[at:at] = rng.randbytes(rng.randint(1, 12))  # insert
            elif data:
                data[at] = rng.choice([0x00, 0x7F, 0x80, 0xFF])  # a boundary byte
        out.append(bytes(data))
    return out


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def _pids(stack: RunningStack) -> dict[str, int]:
    pid_dir = stack.stack.run_dir / "pids"
    return {p.stem: int(p.read_text().split()[0]) for p in pid_dir.glob("*.pid")}  # pid start


def test_fuzzed_requests_get_actionable_statuses_and_the_stack_stays_whole(
    stack: RunningStack,
) -> None:
    key = stack.keys["tenant-a"]
    pids = _pids(stack)
    before = {name: _rss_mb(pid) for name, pid in pids.items()}
    codes: dict[grpc.StatusCode, int] = {}
    with grpc.insecure_channel(stack.target) as channel:
        call = _raw_complete(channel)

        @settings(
            max_examples=_GENERATED,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(_request)
        def generated(request: pb.CompleteRequest) -> None:
            code = _status(call, request.SerializeToString(), key)
            codes[code] = codes.get(code, 0) + 1

        generated()
        seed = build_request("How do I reset my password?", namespace="fuzz", max_tokens=16)
        for body in _mutations(seed.SerializeToString(), _MUTATED):
            code = _status(call, body, key)
            codes[code] = codes.get(code, 0) + 1

    assert sum(codes.values()) >= _MUTATED + 100
    assert codes.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > 100  # the fuzz reached validation
    protocols = {service.name: service.protocol for service in stack.stack.managed()}
    for name, address in stack.addresses.items():
        if protocols[name] != "grpc":
            continue  # the HTTP front and Redis: probed by their own tests
        with grpc.insecure_channel(address) as channel:
            stub: Any = health_pb2_grpc.HealthStub(channel)  # grpc_health ships no stub types
            health = stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING, name
    after = {name: _rss_mb(pid) for name, pid in pids.items()}
    print(f"fuzz: {sum(codes.values())} requests, {codes}")
    for name in sorted(pids):
        print(f"fuzz: {name} RSS {before[name]:.0f} -> {after[name]:.0f} MB")
        assert after[name] - before[name] < _GROWTH_MB, (name, before[name], after[name])
