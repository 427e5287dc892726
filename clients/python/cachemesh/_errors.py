"""One exception tree for everything the Gateway refuses."""

from __future__ import annotations

import grpc

from cachemesh.retry_info import retry_delay_s


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
    """The request is malformed; the message names the field (INVALID_ARGUMENT)."""


class NotFoundError(InvalidRequestError):
    """The request names a model the Gateway does not serve (NOT_FOUND); the message lists
    those it does. An InvalidRequestError too (it was one before NOT_FOUND was its code)."""


class RateLimitError(CachemeshError):
    """A size or rate limit, or a budget, was hit (RESOURCE_EXHAUSTED); ``retry_after_s`` is
    the wait the Gateway asked for (google.rpc.RetryInfo), None when it named none."""

    retry_after_s: float | None = None


class UnavailableError(CachemeshError):
    """No layer could serve the request (UNAVAILABLE, DEADLINE_EXCEEDED), or it did not reach
    you in time: its answer may have been made (and billed), so its text names the
    ``request_id`` to retry with."""

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text} (request_id {self.request_id})" if self.request_id else text


_BY_CODE: dict[grpc.StatusCode, type[CachemeshError]] = {
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RateLimitError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: UnavailableError,
}


def from_rpc_error(error: grpc.RpcError, request_id: str = "") -> CachemeshError:
    # grpc.aio's AioRpcError carries code() and details() but is not a grpc.Call
    call = isinstance(error, grpc.Call | grpc.aio.AioRpcError)
    code = error.code() if call else grpc.StatusCode.UNKNOWN
    details = (error.details() if call else None) or str(error)
    result = _BY_CODE.get(code, CachemeshError)(code, details, request_id)
    if isinstance(result, RateLimitError) and call:
        result.retry_after_s = retry_delay_s(error.trailing_metadata())
    return result


def incomplete(request_id: str) -> UnavailableError:
    """A stream that ended without its ``end`` chunk (a proxy closed it early)."""
    return UnavailableError(
        grpc.StatusCode.UNAVAILABLE,
        "the stream ended without its end chunk: the answer is incomplete; retry with the same "
        "request_id",
        request_id,
    )
