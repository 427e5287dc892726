"""How long a refused call asks its caller to wait: ``google.rpc.RetryInfo`` in the status
details (the ``grpc-status-details-bin`` trailer), as the Gateway sends with
``RESOURCE_EXHAUSTED`` when a tenant is over a rate limit or a budget."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

STATUS_DETAILS_KEY = "grpc-status-details-bin"


def status_details(trailing_metadata: Iterable[Any] | None) -> status_pb2.Status | None:
    """The ``google.rpc.Status`` a call ended with, if its server sent one."""
    for item in trailing_metadata or ():
        key, value = item
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            try:
                return status_pb2.Status.FromString(value)
            except DecodeError:
                return None
    return None


def retry_delay_s(trailing_metadata: Iterable[Any] | None) -> float | None:
    """The wait RetryInfo asks for, in seconds; None when the call carried no RetryInfo."""
    status = status_details(trailing_metadata)
    if status is None:
        return None
    for detail in status.details:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):  # False for a detail of another type
            return float(info.retry_delay.seconds + info.retry_delay.nanos / 1e9)
    return None
