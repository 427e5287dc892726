"""Bytes that are not a message: INVALID_ARGUMENT with a short reason, nothing logged above DEBUG.

Sent raw to every service's methods, with and without credentials: corrupt wire format,
invalid UTF-8 in a string field, and nesting 50,000 deep.
"""

from __future__ import annotations

import json
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.common.metrics import NONE
from tests.integration.harness import RunningStack

pytestmark = pytest.mark.integration

_BODIES = {
    "corrupt": b"\xff\xfe\x00 not a protobuf",
    "bad utf-8": b"\x0a\x03\xff\xfe\xfd",  # field 1 (a string) holding invalid UTF-8
    "50k deep": b"\x1a\x02" * 50_000,
}
_METHODS = {
    "router": ["/cachemesh.v1.Gateway/Complete", "/cachemesh.v1.Gateway/StreamComplete"],
    "semantic-cache": ["/cachemesh.v1.SemanticCache/Lookup", "/cachemesh.v1.SemanticCache/Store"],
    "prefix-cache": ["/cachemesh.v1.PrefixCache/Plan", "/cachemesh.v1.PrefixCache/Commit"],
    "model": ["/cachemesh.v1.Model/Generate"],
}
_REFUSED = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED)
_STREAMING = {"/cachemesh.v1.Gateway/StreamComplete", "/cachemesh.v1.Model/Generate"}


def _send(
    channel: grpc.Channel, method: str, body: bytes, metadata: tuple[tuple[str, str], ...]
) -> grpc.RpcError:
    raw = lambda b: b  # noqa: E731 - bytes in, bytes out
    with pytest.raises(grpc.RpcError) as caught:
        if method in _STREAMING:
            stream = channel.unary_stream(method, request_serializer=raw, response_deserializer=raw)
            list(stream(body, metadata=metadata, timeout=10))
        else:
            unary = channel.unary_unary(method, request_serializer=raw, response_deserializer=raw)
            unary(body, metadata=metadata, timeout=10)
    error = caught.value
    assert isinstance(error, grpc.RpcError)
    return error


def _log_size(stack: RunningStack, service: str) -> int:
    return (stack.stack.run_dir / "logs" / f"{service}.log").stat().st_size


@pytest.mark.parametrize("service", sorted(_METHODS))
def test_malformed_messages_are_refused_as_invalid_argument_without_a_log_line(
    stack: RunningStack, service: str
) -> None:
    credentials = {
        "router": (("authorization", f"Bearer {stack.keys['tenant-a']}"),),
    }.get(service, (("x-cachemesh-internal", stack.internal_token),))
    before = _log_size(stack, service)
    with grpc.insecure_channel(
        stack.addresses[service], options=[("grpc.max_send_message_length", 1 << 20)]
    ) as channel:
        for method in _METHODS[service]:
            for name, body in _BODIES.items():
                for metadata in ((), credentials):
                    error = _send(channel, method, body, metadata)
                    details = error.details() or ""
                    if name == "50k deep" and "malformed" not in details:
                        # it parses as this message (its field 3 is text): refused as such
                        assert error.code() in _REFUSED, (method, error.code())
                        continue
                    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, name)
                    assert details.startswith("malformed request:"), details
                    assert len(details) < 300 and "Traceback" not in details
    with (stack.stack.run_dir / "logs" / f"{service}.log").open("rb") as log:
        log.seek(before)
        logged = log.read().decode("utf-8", "replace")
    assert "Traceback" not in logged and " ERROR " not in logged and " WARNING " not in logged, (
        logged
    )


def _errors(stack: RunningStack) -> float:
    address = stack.stack.metrics_addresses["router"]
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "cachemesh_router_errors_total"
        and sample.labels.get("tenant") == NONE
        and sample.labels.get("code") == "INVALID_ARGUMENT"
    )


def test_the_gateways_malformed_requests_are_counted_and_logged(stack: RunningStack) -> None:
    """Refused before the servicer (RequestLog and the metrics live there), they were in no
    metric and no access-log line: 20 such calls, errors_total +0. Now each is counted with no
    tenant (its key was never read) and has its access-log line."""
    before, log_before = _errors(stack), _log_size(stack, "router")
    key = (("authorization", f"Bearer {stack.keys['tenant-a']}"),)
    with grpc.insecure_channel(stack.addresses["router"]) as channel:
        for method in _METHODS["router"]:
            for metadata in ((), key):
                _send(channel, method, _BODIES["bad utf-8"], metadata)
    assert _errors(stack) - before == 4
    with (stack.stack.run_dir / "logs" / "router.log").open("rb") as log:
        log.seek(log_before)
        lines = [json.loads(line) for line in log.read().decode().splitlines()]
    refused = [
        (line["method"], line["tenant"])
        for line in lines
        if line.get("logger") == "cachemesh.access" and line["status"] == "INVALID_ARGUMENT"
    ]
    assert sorted(refused) == [("Complete", "")] * 2 + [("StreamComplete", "")] * 2
