"""Errors as each HTTP API shapes them, and the Gateway's status codes mapped to them.

``ApiError`` is what the front raises for a request it refuses, before or after the Gateway:
an HTTP status, a kind (``invalid_request``, ``authentication``, ...), a message a person can
act on, and for 429 the seconds to wait. Each API renders it in its own JSON error shape
(``anthropic_body`` / ``openai_body``) with the status code its SDK maps to its own exception
class (400 BadRequestError, 401 AuthenticationError, 413, 429 RateLimitError, 529/503
overloaded, 500).

Both SDKs retry 408, 409, 429 and any status >= 500 twice by default, unless the response says
``x-should-retry: false``. It says so for the refusals a retry would only repeat: the
caller's mistakes, a Gateway deadline (the same request gets the same deadline, and a cut
answer is billed for what it produced: three model calls, three bills), and a failure of the
front once the Gateway has answered (billed). A rate limit, an overload and another fault
leave the SDKs free to retry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Literal

from cachemesh.retry_info import (
    BUDGET_EXHAUSTED,
    CONTEXT_WINDOW,
    RATE_LIMITED,
    REQUEST_TOO_LARGE,
    UNSUPPORTED_VALUE,
    UPSTREAM_RETRIED,
)
from services.common.errors import Code

Api = Literal["anthropic", "openai"]
Kind = Literal[
    "invalid_request",
    "authentication",
    "permission",
    "not_found",
    "no_route",
    "no_method",
    "request_too_large",
    "request_timeout",
    "rate_limit",
    "overloaded",
    "timeout",
    "api",
]

_ANTHROPIC_TYPE: dict[Kind, str] = {
    "invalid_request": "invalid_request_error",
    "authentication": "authentication_error",
    "permission": "permission_error",
    "not_found": "not_found_error",
    "no_route": "not_found_error",
    "no_method": "invalid_request_error",
    "request_too_large": "request_too_large",
    "request_timeout": "invalid_request_error",  # the caller's body came too slowly
    "rate_limit": "rate_limit_error",
    "overloaded": "overloaded_error",
    "timeout": "timeout_error",
    "api": "api_error",
}
# OpenAI's error types: invalid_request_error for the caller's mistakes (401 included, with
# code invalid_api_key), and the server's own for the rest.
_OPENAI_TYPE: dict[Kind, tuple[str, str | None]] = {
    "invalid_request": ("invalid_request_error", None),
    "authentication": ("invalid_request_error", "invalid_api_key"),
    "permission": ("invalid_request_error", "permission_denied"),
    "not_found": ("invalid_request_error", "model_not_found"),
    "no_route": ("invalid_request_error", None),
    "no_method": ("invalid_request_error", None),
    "request_too_large": ("invalid_request_error", "request_too_large"),
    "request_timeout": ("invalid_request_error", "request_timeout"),
    "rate_limit": ("rate_limit_exceeded", "rate_limit_exceeded"),
    "overloaded": ("server_error", "overloaded"),
    "timeout": ("server_error", "timeout"),
    "api": ("server_error", None),
}
_STATUS: dict[Kind, int] = {
    "invalid_request": 400,
    "authentication": 401,
    "permission": 403,
    "not_found": 404,
    "no_route": 404,
    "no_method": 405,
    "request_too_large": 413,
    "request_timeout": 408,
    "rate_limit": 429,
    "overloaded": 529,  # Anthropic's overloaded; OpenAI's is 503 (status_for)
    "timeout": 504,
    "api": 500,
}
# the gRPC code of each kind's meaning: the ``status`` of the access line of a request the
# front refused itself (``access_log``), in the router's lines' words
_CODE: dict[Kind, Code] = {
    "invalid_request": Code.INVALID_ARGUMENT,
    "authentication": Code.UNAUTHENTICATED,
    "permission": Code.PERMISSION_DENIED,
    "not_found": Code.NOT_FOUND,
    "no_route": Code.NOT_FOUND,
    "no_method": Code.UNIMPLEMENTED,
    "request_too_large": Code.RESOURCE_EXHAUSTED,
    "request_timeout": Code.DEADLINE_EXCEEDED,  # the caller's body came too slowly
    "rate_limit": Code.RESOURCE_EXHAUSTED,
    "overloaded": Code.UNAVAILABLE,
    "timeout": Code.DEADLINE_EXCEEDED,
    "api": Code.INTERNAL,
}
# the refusals a retry would only repeat (see the module's docstring)
_FINAL: frozenset[Kind] = frozenset(
    (
        "invalid_request",
        "authentication",
        "permission",
        "not_found",
        "no_route",
        "no_method",
        "request_too_large",
        "timeout",
    )
)


@dataclass
class ApiError(Exception):
    kind: Kind
    message: str
    # 429, or a 529 / 503 whose providers asked for a wait: whole seconds before a retry
    retry_after_s: int | None = None
    param: str | None = None  # OpenAI's ``param``: the request field at fault
    # a retry would only repeat it, whatever its kind: the front failed after the Gateway
    # answered (and billed) the call, and a retry is a model call and a bill again
    final: bool = False
    # the id the Gateway made up for a request sent without an Idempotency-Key (its refusal's
    # trailer): the id its access line and trace name, which the response names too
    request_id: str = ""
    # OpenAI's ``code`` where it has its own for the refusal (``invalid_parameter_combination``,
    # ``unsupported_parameter``); None: the kind's
    openai_code: str | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def status_for(self, api: Api) -> int:
        if self.kind == "overloaded" and api == "openai":
            return 503
        return _STATUS[self.kind]

    @property
    def code(self) -> Code:
        return _CODE[self.kind]

    def headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        if self.retry_after_s is not None:
            headers["retry-after"] = str(self.retry_after_s)
        if self.kind in _FINAL or self.final:
            headers["x-should-retry"] = "false"  # honoured by both SDKs' retry policy
        return headers

    def body_for(self, api: Api, request_id: str) -> dict[str, Any]:
        if api == "anthropic":
            return {
                "type": "error",
                "error": {"type": _ANTHROPIC_TYPE[self.kind], "message": self.message},
                "request_id": request_id,
            }
        kind, code = _OPENAI_TYPE[self.kind]
        code = self.openai_code or code
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": code}}


def invalid(message: str, param: str | None = None, openai_code: str | None = None) -> ApiError:
    """A 400 (``param``: the field at fault; ``openai_code``: OpenAI's own ``code`` for it)."""
    return ApiError("invalid_request", message, param=param, openai_code=openai_code)


# The model engine's message for a prompt over the context window (a 400 in both APIs, not
# the 413 of a request over the size limit).
_CONTEXT_WINDOW = "context window"
RATE_LIMIT_RETRY_AFTER_S = 1
# A 429 whose wait is longer than this says x-should-retry: false (its retry-after stays, as
# information): the SDKs' retry policies sleep whatever retry-after says (the Anthropic SDK's up
# to ~50 days; OpenAI's up to 60 s), so a spent daily budget (retry-after: the seconds to 00:00
# UTC) held a messages.create() asleep for hours, twice, instead of raising RateLimitError.
RETRYABLE_WAIT_S = 60


# What a refusal whose model call was billed adds to its message (the Gateway's pushback).
# A Gateway's CANCELLED, as the HTTP APIs report it: it said "CANCELLED" only, answered 500
# "the Gateway failed (CANCELLED)" where a moment later it was 529 "unreachable; retry".
GATEWAY_STOPPED = "the Gateway stopped before answering (a restart or shutdown); retry"
BILLED = (
    "a model call of this request was billed for what it produced before it failed; a retry "
    "is a new model call, billed again"
)


def _context_window(message: str) -> ApiError:
    """A prompt (with ``max_tokens``) over the model's context window: a 400, with OpenAI's
    code and param for it (``context_length_exceeded``, ``messages``), which an application
    reads (the SDK's ``BadRequestError.code``) to trim its conversation or turn to a model
    with a longer window; before, both null, as for any mistake of the caller's."""
    return ApiError(
        "invalid_request", message, param="messages", openai_code="context_length_exceeded"
    )


def from_gateway(
    code: Code,
    message: str,
    retry_after_s: int | None = None,
    *,
    billed: bool = False,
    reason: str | None = None,
) -> ApiError:
    """The Gateway's status as the HTTP APIs report it. ``billed``: the Gateway said not to
    retry (a model call of it was billed without its answer): the refusal is final, whatever
    its kind, since each SDK retry of a 5xx would be a model call and a bill again.
    ``reason``: the Gateway's ErrorInfo reason, which says why a RESOURCE_EXHAUSTED is refused
    (a Gateway that sends none: its wait and its message's words tell)."""
    error = _from_gateway(code, _http_words(message), retry_after_s, reason)
    if billed:
        return replace(error, message=f"{error.message} ({BILLED})", final=True)
    return error


# The Gateway's name for the id that makes a retry answer-once; an HTTP caller sets it as the
# Idempotency-Key header (``facts.IDEMPOTENCY``), and has no request_id to send.
_REQUEST_ID = re.compile(r"\brequest_id\b")


def _http_words(message: str) -> str:
    """The Gateway's message in an HTTP caller's words: its ``request_id`` is the caller's
    ``Idempotency-Key`` ("retry with the same request_id" told HTTP callers of a field they
    cannot send)."""
    return _REQUEST_ID.sub("Idempotency-Key", message)


def _from_gateway(
    code: Code, message: str, retry_after_s: int | None, reason: str | None
) -> ApiError:
    if code is Code.INVALID_ARGUMENT and reason == UNSUPPORTED_VALUE:
        # a value the target model's provider refuses for it (a temperature but 1 to a model
        # that takes only its default): OpenAI's own code for it, as OpenAI answers (before,
        # null); its ``param`` is the field the message names, as for every Gateway refusal
        return ApiError("invalid_request", message, openai_code="unsupported_value")
    if code is Code.INVALID_ARGUMENT or code is Code.OUT_OF_RANGE:
        return ApiError("invalid_request", message)
    if code is Code.FAILED_PRECONDITION:
        return ApiError("invalid_request", message)
    if code is Code.UNAUTHENTICATED:
        return ApiError("authentication", message)
    if code is Code.PERMISSION_DENIED:
        return ApiError("permission", message)
    if code is Code.NOT_FOUND:
        return ApiError("not_found", message)
    if code is Code.RESOURCE_EXHAUSTED:
        if reason in (RATE_LIMITED, BUDGET_EXHAUSTED) and retry_after_s is None:
            retry_after_s = RATE_LIMIT_RETRY_AFTER_S  # a limit a wait lifts, its wait unsaid
        if reason == CONTEXT_WINDOW:
            return _context_window(message)
        if reason == REQUEST_TOO_LARGE:
            return ApiError("request_too_large", message)
        if retry_after_s is not None:
            final = retry_after_s > RETRYABLE_WAIT_S  # a budget spent until midnight
            return ApiError("rate_limit", message, retry_after_s=retry_after_s, final=final)
        if _CONTEXT_WINDOW in message:
            return _context_window(message)
        if reason:
            # a reason this front does not know (a newer Gateway's) and no wait: a limit, not
            # a final 413 by the reason alone; the SDKs retry it after a second
            return ApiError("rate_limit", message, retry_after_s=RATE_LIMIT_RETRY_AFTER_S)
        return ApiError("request_too_large", message)  # a Gateway that sends no reason
    if code is Code.UNAVAILABLE:
        # the providers' own wait (each replica's provider answered 429 with a retry-after past
        # the call's deadline), for the SDKs to honour: before, none, and they retried at once
        if retry_after_s is not None:
            # every replica had retried its provider already (``UPSTREAM_RETRIED``): the SDK
            # is told not to retry (each of its retries was 3 provider calls more: 9 for one
            # create()), its retry-after kept for a caller's own retry later
            final = retry_after_s > RETRYABLE_WAIT_S or reason == UPSTREAM_RETRIED
            return ApiError("overloaded", message, retry_after_s=retry_after_s, final=final)
        return ApiError("overloaded", message)
    if code is Code.CANCELLED:
        # only the Gateway's side ends a call so (this front's own cancel is its task's): a
        # router stopping cut it as it arrived, before a handler ran (a call its grace cuts
        # is UNAVAILABLE; a billed one carries the no-retry mark, final above)
        return ApiError("overloaded", GATEWAY_STOPPED)
    if code is Code.DEADLINE_EXCEEDED:
        return ApiError("timeout", message)
    return ApiError("api", f"the Gateway failed ({code.name}): {message}")
