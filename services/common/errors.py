"""The one error a service core raises for a request it refuses: a status code and a message.

``Code`` names the canonical status codes (google.rpc.Code, the names gRPC uses too) without
importing gRPC, so the cores stay free of the transport; each servicer maps a ``Code`` to its
``grpc.StatusCode`` (``services.common.status``).
"""

from __future__ import annotations

import enum
from typing import TypedDict

SHOWN_CHARS = 64  # the most of a caller's value an error message repeats
# the trailer a refusal's machine-readable ``mark`` travels in (``RequestError.mark``: sent by
# ``services.common.status.answered``, read by the router's ``grpc_adapters.failed``)
MARK_KEY = "cachemesh-mark"
# a mark: prefix-cache refused the call because its replica's model table lacks a model the
# call names (``TableLacksModel``, FAILED_PRECONDITION): no fault of the request, and a replica
# whose table has the model takes it (a rolling deploy passes); not told apart by message text
TABLE_LACKS_MODEL = "table-lacks-model"


def shown(value: str) -> str:
    """``value`` as an error message may repeat it: quoted (a NUL or a right-to-left mark is
    escaped), and cut when long (a caller's 1 MB model id is neither echoed back,
    where it overflows the reply's metadata limit, nor written into the log)."""
    if len(value) <= SHOWN_CHARS:
        return repr(value)
    return f"{value[:SHOWN_CHARS]!r}... ({len(value):,} characters)"


class Code(enum.Enum):
    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class RetryAdvice(TypedDict):
    """What a refusal tells its callers of retrying it (``RequestError``'s and ``CallFailed``'s
    ``retry_after_s``, ``retried`` and ``backoff_wait``), as keyword arguments: the one way a
    refusal passes them on to another, not three fields copied by hand at each place."""

    retry_after_s: int | None
    retried: bool
    backoff_wait: bool


class RetryAdvised:
    """A refusal carrying ``RetryAdvice`` (``RequestError``, the router's ``CallFailed``)."""

    retry_after_s: int | None
    retried: bool
    backoff_wait: bool

    def retry_advice(self) -> RetryAdvice:
        """Its retry fields, to pass on to another refusal."""
        return RetryAdvice(
            retry_after_s=self.retry_after_s, retried=self.retried, backoff_wait=self.backoff_wait
        )


class RequestError(RetryAdvised, Exception):
    """A request refused with ``code``; ``message`` names the field and what to do.

    ``reason`` (optional) is a short account of the refusal fit to pass on to the caller's own
    caller: no replica name, address or credential, printable ASCII (a model replica sends it
    to the router in the ``cachemesh-reason`` trailer, and the router names it to the client).

    ``retry_after_s`` (optional): the whole seconds the refused call's upstream asked to be
    left alone (a provider's 429 ``retry-after`` that outlasted the call's deadline), sent on
    as a ``retry-after`` trailer, so that the caller's caller waits as the provider asked.

    ``retried``: the refused call's upstream was already retried (a model replica spent its
    ``PROVIDER_MAX_RETRIES`` on a provider's 529 / 503 / 429): the callers above must not retry
    it again at once, each of their retries being as many upstream calls again (a retry storm);
    ``retry_after_s`` is then the provider's own retry-after if it sent one, else the wait the
    replica's next backoff would have been (``backoff_wait``).

    ``backoff_wait``: ``retry_after_s`` is the replica's own backoff, not a wait its provider
    asked for, so that no caller says "as the provider asked" of it.

    ``mark``: a fixed, machine-readable kind of the refusal its callers act on (e.g.
    ``TABLE_LACKS_MODEL``; "" = none), sent in the ``MARK_KEY`` trailer."""

    def __init__(
        self,
        code: Code,
        message: str,
        reason: str = "",
        *,
        retry_after_s: int | None = None,
        retried: bool = False,
        backoff_wait: bool = False,
        mark: str = "",
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = "".join(c for c in reason if " " <= c <= "~")[:200]
        self.retry_after_s = retry_after_s
        self.retried = retried
        self.backoff_wait = backoff_wait
        self.mark = mark
