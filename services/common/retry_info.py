"""A refusal's ``google.rpc.Status`` with ``RetryInfo`` (and the limits as a ``QuotaFailure``),
sent in the ``grpc-status-details-bin`` trailer, plus ``retry-after`` in whole seconds for
clients that read no status details; an ``ErrorInfo`` says why (a rate, a budget, a request too
large to pass, which has no RetryInfo). ``cachemesh.retry_info`` reads it back."""

from __future__ import annotations

import math

from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from cachemesh.retry_info import ERROR_DOMAIN, STATUS_DETAILS_KEY
from services.common.errors import Code

RETRY_AFTER_KEY = "retry-after"


def error_info(reason: str) -> any_pb2.Any:
    """``google.rpc.ErrorInfo`` of the Gateway's ``ERROR_DOMAIN`` with ``reason`` (one of
    ``cachemesh.retry_info``'s), packed as a status detail."""
    packed = any_pb2.Any()
    packed.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN))
    return packed


def refusal_trailers(code: Code, message: str, reason: str) -> tuple[tuple[str, bytes], ...]:
    """The status details of a refusal no wait lifts (a request too large: ``reason``), with
    no RetryInfo: a client tells it from a rate limit by its ErrorInfo."""
    status = status_pb2.Status(code=code.value, message=message, details=[error_info(reason)])
    return ((STATUS_DETAILS_KEY, status.SerializeToString()),)


def pushback_trailers(
    code: Code, message: str, retry_after_s: int, reason: str
) -> tuple[tuple[str, bytes], ...]:
    """The status details of a refusal its caller must not retry at once: a ``RetryInfo`` of
    ``retry_after_s`` (the wait before a retry of the caller's own) and an ``ErrorInfo`` saying
    why (``reason``)."""
    retry = any_pb2.Any()
    retry.Pack(
        error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=retry_after_s))
    )
    details = [retry, error_info(reason)]
    status = status_pb2.Status(code=code.value, message=message, details=details)
    return ((STATUS_DETAILS_KEY, status.SerializeToString()),)


def retry_trailers(
    code: Code,
    message: str,
    retry_after_ms: int,
    subject: str,
    descriptions: tuple[str, ...],
    reason: str = "",
) -> tuple[tuple[str, str | bytes], ...]:
    """``descriptions``: one ``QuotaFailure`` violation of ``subject`` each (the limits it is
    over, the one ``retry_after_ms`` waits for first); ``reason``: an ErrorInfo's (none when
    empty)."""
    delay = duration_pb2.Duration(
        seconds=retry_after_ms // 1000, nanos=(retry_after_ms % 1000) * 1_000_000
    )
    retry = any_pb2.Any()
    retry.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    quota = any_pb2.Any()
    quota.Pack(
        error_details_pb2.QuotaFailure(
            violations=[
                error_details_pb2.QuotaFailure.Violation(subject=subject, description=description)
                for description in descriptions
            ]
        )
    )
    details = [retry, quota, *([error_info(reason)] if reason else [])]
    status = status_pb2.Status(code=code.value, message=message, details=details)
    return (
        (STATUS_DETAILS_KEY, status.SerializeToString()),
        (RETRY_AFTER_KEY, str(max(1, math.ceil(retry_after_ms / 1000)))),
    )
