"""Health checks of the stack's processes: grpc.health.v1 (the overall service "") for the gRPC
services, ``GET /readyz`` for the HTTP front (every service answers it on its plaintext metrics
port too: compose's health checks and the runner's own, whatever TLS the service port speaks),
PING for the stack's Redis.

grpc is imported by ``probe`` itself: the stack CLI's ``down``, ``running``, ``stop``, ``keys``
and the supervisor probe no gRPC service, and importing grpc and its health stubs cost each of
them ~85 ms of start-up."""

from __future__ import annotations

from typing import Any

from services.tools.readyz import SERVING, UNREACHABLE, probe_http
from services.tools.stack.redis_process import probe_redis

__all__ = ["SERVING", "UNREACHABLE", "probe", "probe_as", "probe_http"]


def probe(address: str, timeout_s: float = 1.0) -> str:
    """The health status name at ``address`` ("SERVING", "NOT_SERVING", ...) or UNREACHABLE."""
    import grpc  # here, not at the top: see the module's docstring
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    # the stack's own loopback services: never through an HTTP proxy (https_proxy et al.)
    with grpc.insecure_channel(address, options=[("grpc.enable_http_proxy", 0)]) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # grpc_health ships no stub types
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        except grpc.RpcError:
            return UNREACHABLE
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def probe_as(protocol: str, address: str, timeout_s: float = 1.0) -> str:
    if protocol == "redis":
        return probe_redis(address, timeout_s)
    return probe_http(address, timeout_s) if protocol == "http" else probe(address, timeout_s)
