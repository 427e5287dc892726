"""The running stack as the integration tests see it, and the settings they start it with."""

from __future__ import annotations

import socket
from dataclasses import dataclass

import grpc

from cachemesh.v1 import prefix_cache_pb2, prefix_cache_pb2_grpc
from services.stack.runner import Stack
from tests.integration.otlp_sink import OtlpSink


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


def stack_overrides(ports: dict[str, int], sink: OtlpSink) -> dict[str, str]:
    at = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
    return {
        "ROUTER_LISTEN": at["router"],
        "SEMANTIC_CACHE_LISTEN": at["semantic-cache"],
        "PREFIX_CACHE_LISTEN": at["prefix-cache"],
        "MODEL_LISTEN": at["model"],
        "MODEL_2_LISTEN": at["model-2"],
        "SEMANTIC_CACHE_ADDR": at["semantic-cache"],
        "PREFIX_CACHE_ADDR": at["prefix-cache"],
        "MODEL_REPLICAS": (
            f"sim-small={at['model']},sim-large={at['model']},sim-large={at['model-2']}"
        ),
        "SIM_TIME_SCALE": "0.02",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "CACHEMESH_GRACE_S": "2",
    }
