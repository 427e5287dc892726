"""How long a refused call asks its caller to wait: ``google.rpc.RetryInfo`` in the status
details (the ``grpc-status-details-bin`` trailer), as the Gateway sends with
``RESOURCE_EXHAUSTED`` when a tenant is over a rate limit or a budget; and why it was refused:
``google.rpc.ErrorInfo`` (domain ``ERROR_DOMAIN``), whose ``reason`` tells a request too large
to pass (no wait helps) from a limit a wait lifts."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

STATUS_DETAILS_KEY = "grpc-status-details-bin"
# gRPC's server pushback (gRFC A6): a negative delay says not to retry the call. The Gateway
# ends so a call that failed after a model call of it was billed without its answer: a retry
# would be a new model call, billed again.
PUSHBACK_KEY = "grpc-retry-pushback-ms"

# A refusal's trailer: the request_id the Gateway made up for a request sent without one,
# which its access line and trace name (a caller that sent one knows it already).
REQUEST_ID_KEY = "cachemesh-request-id"

# google.rpc.ErrorInfo's domain and reasons on the Gateway's RESOURCE_EXHAUSTED
ERROR_DOMAIN = "cachemesh.dev"
CONTEXT_WINDOW = "CONTEXT_WINDOW"  # the prompt (and max_tokens) over the model's context window
REQUEST_TOO_LARGE = "REQUEST_TOO_LARGE"  # over a size limit: the Gateway's or a provider's
RATE_LIMITED = "RATE_LIMITED"  # the tenant's request or token rate: RetryInfo says the wait
BUDGET_EXHAUSTED = "BUDGET_EXHAUSTED"  # the tenant's day or month budget: RetryInfo too
TOO_LARGE_REASONS = frozenset((CONTEXT_WINDOW, REQUEST_TOO_LARGE))
# on an UNAVAILABLE: every model replica had retried its provider already (its 529s, 503s,
# 429s), so the call ends with a negative server pushback (no retry at once: each would be as
# many provider calls again) and RetryInfo says the wait before a retry of the caller's own
UPSTREAM_RETRIED = "UPSTREAM_RETRIED"
# on an UNAVAILABLE: every model replica's provider asked for a wait (a 429's retry-after) that
# the client's deadline has no room for, so the call ends with a negative server pushback (a
# retry at once would only be refused again, and each is as many provider calls) and RetryInfo
# says the wait; a wait with room for it is pushed back as itself, and the channel waits it
UPSTREAM_RATE_LIMITED = "UPSTREAM_RATE_LIMITED"
# the reasons of a refusal with a negative pushback that made no model call: not billed
UNBILLED_FINAL = frozenset((UPSTREAM_RETRIED, UPSTREAM_RATE_LIMITED))
# on an INVALID_ARGUMENT: a field the target model's API has, at a value its provider refuses
# for that model (a temperature but 1 to one that takes only its default: the message names
# the field and the model); OpenAI's ``code`` for it is ``unsupported_value``
UNSUPPORTED_VALUE = "UNSUPPORTED_VALUE"


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


def no_retry(trailing_metadata: Iterable[Any] | None) -> bool:
    """Whether the call ended with a negative server pushback: do not retry it."""
    for item in trailing_metadata or ():
        key, value = item
        if key == PUSHBACK_KEY:
            text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
            return text.strip().startswith("-")
    return False


def made_request_id(trailing_metadata: Iterable[Any] | None) -> str:
    """The request_id the Gateway made up for a refused request sent without one ("" when
    it sent none: the caller's own id, or a refusal before the Gateway made one)."""
    for item in trailing_metadata or ():
        key, value = item
        if key == REQUEST_ID_KEY:
            text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
            return text if text.isascii() and text.isprintable() else ""
    return ""


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


RETRY_AFTER_KEY = "retry-after"


def retry_after_s(trailing_metadata: Iterable[Any] | None) -> float | None:
    """The wait a refusal asks for: its RetryInfo, else its ``retry-after`` trailer (whole
    seconds: the Gateway sends it alone on an UNAVAILABLE whose providers asked for a wait, a
    429's retry-after); None when it names none (or no figure)."""
    delay = retry_delay_s(trailing_metadata)
    if delay is not None:
        return delay
    items = list(trailing_metadata or ())
    for key, value in items:
        if key == RETRY_AFTER_KEY:
            text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
            return float(text) if text.isascii() and text.isdigit() else None
    return None


def error_reason(trailing_metadata: Iterable[Any] | None) -> str | None:
    """The ``reason`` of the Gateway's ErrorInfo (``ERROR_DOMAIN``); None when it sent none."""
    status = status_details(trailing_metadata)
    if status is None:
        return None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info) and info.domain == ERROR_DOMAIN:
            return info.reason
    return None
