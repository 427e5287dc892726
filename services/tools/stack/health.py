"""gRPC health checks (grpc.health.v1, the overall service "") of the stack's processes."""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = "SERVING"
UNREACHABLE = "UNREACHABLE"


def probe(address: str, timeout_s: float = 1.0) -> str:
    """The health status name at ``address`` ("SERVING", "NOT_SERVING", ...) or UNREACHABLE."""
    with grpc.insecure_channel(address) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # grpc_health ships no stub types
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        except grpc.RpcError:
            return UNREACHABLE
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
