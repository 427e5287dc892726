"""One exception tree for everything the Gateway refuses."""

from __future__ import annotations

import re

import grpc

from cachemesh.retry_info import TOO_LARGE_REASONS, error_reason, retry_after_s, retry_delay_s


class CachemeshError(Exception):
    """A call to the Gateway failed; ``code`` is the gRPC status. ``request_id`` is the id the
    call was sent with (the client makes one when the request has none): to retry a call
    whose answer may have been made (and billed) without reaching you, send the request again
    with that id, and the Gateway answers it once."""

    def __init__(self, code: grpc.StatusCode, message: str, request_id: str = "") -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id

    def __reduce__(self) -> tuple[object, ...]:
        # picklable (a process pool hands its workers' errors back so)
        return (type(self), (self.code, self.message, self.request_id), self.__dict__)


class AuthenticationError(CachemeshError):
    """No API key, or one the Gateway does not know (UNAUTHENTICATED)."""


class InvalidRequestError(CachemeshError):
    """The request is malformed; the message names the field (INVALID_ARGUMENT). ``reason``:
    the Gateway's ErrorInfo reason, ``UNSUPPORTED_VALUE`` (``cachemesh.retry_info``) for a
    field the target model's API has at a value its provider refuses for that model (a
    temperature but its default to one that takes only that); None when the Gateway named
    none (any other malformed field, or a Gateway that sends none)."""

    reason: str | None = None


class NotFoundError(InvalidRequestError):
    """The request names a model the Gateway does not serve (NOT_FOUND); the message lists
    those it does. An InvalidRequestError too (it was one before NOT_FOUND was its code)."""


class RateLimitError(CachemeshError):
    """A rate limit or a budget was hit (RESOURCE_EXHAUSTED); ``retry_after_s`` is the wait
    the Gateway asked for (google.rpc.RetryInfo), None when it named none. ``reason``: the
    Gateway's ErrorInfo reason (``RATE_LIMITED``, ``BUDGET_EXHAUSTED``; None from a Gateway
    that sends none). A request too large to pass is a ``RequestTooLargeError`` instead."""

    retry_after_s: float | None = None
    reason: str | None = None


class RequestTooLargeError(CachemeshError):
    """The request is too large to pass, which no wait fixes (RESOURCE_EXHAUSTED with the
    Gateway's ErrorInfo reason ``CONTEXT_WINDOW``: the prompt and ``max_tokens`` over the
    model's context window; ``REQUEST_TOO_LARGE``: over the Gateway's
    ``ROUTER_MAX_REQUEST_BYTES`` or a provider's size limit, or alone over the provider
    account's tokens per minute). Not a ``RateLimitError``: retrying it as it is gets the same
    refusal; shorten the messages, system or tools, or lower ``max_tokens``. ``reason``: the
    ErrorInfo reason."""

    reason: str | None = None


class MessageTooLargeError(RequestTooLargeError):
    """A message was over gRPC's size limit (RESOURCE_EXHAUSTED with gRPC's own "message
    larger than max"): the reply or the request is too large to pass, which no wait fixes. Not
    a ``RateLimitError``: ask for less (a smaller page, one tenant) or raise the limit
    (``CACHEMESH_MAX_MESSAGE_BYTES`` on the stack, the client's channel options).
    ``size_bytes`` and ``limit_bytes``: as gRPC said them (None when it did not). A
    ``RequestTooLargeError`` too (asking for less is the fix of both)."""

    size_bytes: int | None = None
    limit_bytes: int | None = None


class UnavailableError(CachemeshError):
    """No layer could serve the request (UNAVAILABLE; CANCELLED: a stopping router cut the
    call, not gRPC's local CANCELLED of a call this client cancelled or closed, a plain
    ``CachemeshError``), or its answer did not reach you: it may have been made (and billed),
    so its text names the ``request_id`` to retry with (a call that made no answer, cut
    mid-answer, is a new model call, billed again, on its retry).
    DEADLINE_EXCEEDED is its subclass ``DeadlineExceededError``.

    ``retry_after_s``: the wait the Gateway asked for before a retry (None: it named none):
    its providers' own (a 429's retry-after), or, with ``reason`` ``UPSTREAM_RETRIED``, the
    wait after every model replica had retried its provider already (its 529s, 503s), which
    the client's channel does not retry (each retry would be as many provider calls again):
    retry after that wait at the earliest, if at all. ``reason`` ``UPSTREAM_RATE_LIMITED``:
    the providers' wait (a 429's retry-after) was longer than the call's deadline had left,
    over 60 s, or met on the channel's own retry already, so the channel did not retry it (a
    shorter one, the first time, it waits for, then retries once)."""

    retry_after_s: float | None = None
    reason: str | None = None

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text} (request_id {self.request_id})" if self.request_id else text


class DeadlineExceededError(UnavailableError):
    """The call's deadline passed before its answer (DEADLINE_EXCEEDED: the client's
    ``timeout_s``, or the router's ``ROUTER_MODEL_TIMEOUT_S``, said in the message). The
    router ends the model call just before the deadline, so no answer was made; what the model
    produced is billed. A retry, with the id or without, is a new model call, billed again and
    cut the same way: allow a longer deadline (``timeout_s``; ``cachemesh ask --timeout``) or
    ask for a smaller ``max_tokens`` (``smaller_max_tokens_helps``: not when the Gateway says
    the answer had written all of its max_tokens, or its provider gave no token). An
    ``UnavailableError`` too (it was one before it had its own class).

    ``cut_by_gateway`` False: gRPC's own "Deadline Exceeded" (or, mid-stream, "Stream removed
    (Deadline Exceeded)"), no status from the Gateway within the deadline. This side cannot
    tell which: the Gateway may have cut the call and billed what the model produced, its
    status arriving too late, or never received it (down, unreachable or stalled; nothing
    billed). A retry with the ``request_id`` is replayed if an answer was made, else is a new
    model call, billed again."""

    @property
    def cut_by_gateway(self) -> bool:
        """Whether the Gateway said it cut the call at the deadline (a message of its own,
        not one of gRPC's for a deadline that passed on this side, ``_LOCAL_DEADLINES``)."""
        return self.message not in _LOCAL_DEADLINES

    @property
    def smaller_max_tokens_helps(self) -> bool:
        """Whether a smaller ``max_tokens`` could have the answer end in time: not when the
        Gateway's message says it had written all of its max_tokens (its provider's end came
        late) or that its provider gave no token at all."""
        return not any(said in self.message for said in _NOT_ITS_LENGTH)

    def __str__(self) -> str:
        text = CachemeshError.__str__(self)
        said = f"request_id {self.request_id}: " if self.request_id else ""
        if not self.cut_by_gateway:
            return (
                f"{text} ({said}no status from the Gateway within the deadline: the Gateway "
                "may have cut it and billed what the model produced, its status arriving too "
                "late, or never received it; a retry with this request_id is replayed if an "
                "answer was made, else is a new model call, billed again: retry with it, or "
                "allow a longer deadline)"
            )
        advice = "allow a longer deadline"
        if self.smaller_max_tokens_helps:
            advice += " or ask for a smaller max_tokens"
        return (
            f"{text} ({said}not answered in time, billed for what the model produced; a retry "
            f"is a new model call, billed again: {advice})"
        )


# the Gateway's words for a deadline cut that a smaller max_tokens would not have avoided
# (services.router.model_answer): an answer that wrote all of it, a provider that wrote nothing
_NOT_ITS_LENGTH = ("had written all of its max_tokens", "gave no token")

# gRPC's own details of a deadline that passed on this side with no status from the Gateway:
# before any reply, and mid-stream after a chunk. The Gateway's cut says its own words (whose
# deadline, what was billed) and sets no trailer every cut carries (its pushback -1 only once
# a model call was billed), so the words are what tells them apart
_LOCAL_DEADLINES = frozenset({"Deadline Exceeded", "Stream removed (Deadline Exceeded)"})


_BY_CODE: dict[grpc.StatusCode, type[CachemeshError]] = {
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RateLimitError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    # from the Gateway: a stopping router cut the call (as it arrived, or at the end of its
    # grace). gRPC's own, local CANCELLED (the caller closed its Client while a call waited,
    # or cancelled the call: ``_LOCAL_CANCELS``) comes here too and is no such refusal
    grpc.StatusCode.CANCELLED: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}


# gRPC's own details of a CANCELLED made on this side, not sent by the server: the sync
# channel closed under a waiting call ("Channel closed!"), a call cancelled
# ("Locally cancelled by application!", also grpc.aio's as its channel closes), or dropped
# ("Cancelled upon garbage collection!"). The caller's own doing: no retry to be told of.
_LOCAL_CANCELS = frozenset(
    {
        "Channel closed!",
        "Locally cancelled by application!",
        "Cancelled upon garbage collection!",
    }
)


# gRPC's own words for a message over its limit: "SERVER: Sent message larger than max
# (4413096 vs. 4194304)" (the server's reply), "Received message larger than max (...)"
_TOO_LARGE = re.compile(r"(?:Sent|Received) message larger than max(?: \((\d+) vs\. (\d+)\))?")


def from_rpc_error(error: grpc.RpcError, request_id: str = "") -> CachemeshError:
    # grpc.aio's AioRpcError carries code() and details() but is not a grpc.Call
    call = isinstance(error, grpc.Call | grpc.aio.AioRpcError)
    code = error.code() if call else grpc.StatusCode.UNKNOWN
    details = (error.details() if call else None) or str(error)
    too_large = _TOO_LARGE.search(details) if code == grpc.StatusCode.RESOURCE_EXHAUSTED else None
    if too_large is not None:
        return _too_large(code, details, request_id, too_large)
    if code == grpc.StatusCode.CANCELLED and details in _LOCAL_CANCELS:
        return CachemeshError(
            code,
            f"{details} (cancelled by this client, its Client closed or the call cancelled, "
            "not by the Gateway)",
            request_id,
        )
    reason = error_reason(error.trailing_metadata()) if call else None
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and reason in TOO_LARGE_REASONS:
        too_large_request = RequestTooLargeError(code, details, request_id)
        too_large_request.reason = reason
        return too_large_request
    result = _BY_CODE.get(code, CachemeshError)(code, details, request_id)
    if isinstance(result, RateLimitError) and call:
        result.retry_after_s = retry_delay_s(error.trailing_metadata())
        result.reason = reason
    elif isinstance(result, UnavailableError) and call:
        # RetryInfo, else the retry-after trailer the Gateway sends alone (a 429's wait)
        result.retry_after_s = retry_after_s(error.trailing_metadata())
        result.reason = reason
    elif isinstance(result, InvalidRequestError):
        result.reason = reason
    return result


def _too_large(
    code: grpc.StatusCode, details: str, request_id: str, found: re.Match[str]
) -> MessageTooLargeError:
    size, limit = (int(n) if n else None for n in found.groups())
    said = f"{size:,} bytes over the limit of {limit:,}" if size and limit else "over the limit"
    error = MessageTooLargeError(
        code,
        f"a message was larger than gRPC's message size limit ({said}): not a rate limit, "
        "waiting will not help; ask for less (a smaller page_size, one tenant, a shorter "
        "request) or raise the limit (CACHEMESH_MAX_MESSAGE_BYTES). gRPC said: "
        f"{details}",
        request_id,
    )
    error.size_bytes, error.limit_bytes = size, limit
    return error


def incomplete(request_id: str) -> UnavailableError:
    """A stream that ended without its ``end`` chunk (a proxy closed it early)."""
    return UnavailableError(
        grpc.StatusCode.UNAVAILABLE,
        "the stream ended without its end chunk: the answer is incomplete; retry with the same "
        "request_id",
        request_id,
    )
