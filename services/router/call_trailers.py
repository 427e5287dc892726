"""The trailers of a Gateway call that failed (``failed_call_trailers``): gRPC's server
pushback, the providers' wait, and the status details that say why (the router's servicer
ends the call with them)."""

from __future__ import annotations

from collections.abc import Iterable

from cachemesh.retry_info import (
    CONTEXT_WINDOW,
    PUSHBACK_KEY,
    REQUEST_TOO_LARGE,
    UPSTREAM_RATE_LIMITED,
    UPSTREAM_RETRIED,
)
from services.common.errors import Code, RequestError
from services.common.retry_info import RETRY_AFTER_KEY, pushback_trailers, refusal_trailers
from services.router.access_log import Call

Metadata = tuple[tuple[str, str | bytes], ...]

# gRPC's server pushback (gRFC A6): a negative delay tells the client's retry policy not to
# retry the call. The Python client's policy retries UNAVAILABLE (``cachemesh._channel``), and
# each retry of a call whose model work was billed is a new model call, billed again.
NO_RETRY = (PUSHBACK_KEY, "-1")
# a provider's wait the client's channel waits for (a positive pushback) leaves its deadline at
# least this long for the try after it
_PUSHBACK_ROOM_S = 1.0
# the longest provider wait pushed back for the channel to wait (as the SDKs wait an HTTP
# retry-after up to 60 s): a longer one is no retry, its wait told (RetryInfo), whatever the
# client's deadline. Before, any wait up to 366 days was, and the Python client's policy slept
# it 4 times: a 3,600 s wait held a caller with no deadline ~4 h for 5 provider calls
MAX_PUSHBACK_S = 60
# the request metadata gRPC's retry policy sets on each attempt after the first (the attempts
# before it): an attempt that is already a retry gets no second pushback
PREVIOUS_ATTEMPTS_KEY = "grpc-previous-rpc-attempts"


def channel_retried(metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
    """Whether the call is an attempt of the client channel's retry policy after the first
    (``PREVIOUS_ATTEMPTS_KEY`` >= 1; "0", "" or anything not a number marks none)."""
    for key, value in metadata or ():
        if key == PREVIOUS_ATTEMPTS_KEY:
            return isinstance(value, str) and value.isascii() and value.isdigit() and int(value) > 0
    return False


def failed_call_trailers(
    call: Call,
    exc: RequestError,
    made_id: Metadata = (),
    remaining_s: float | None = None,
    retried: bool = False,
) -> Metadata:
    """The trailers of a call that failed with ``exc`` (and ``made_id``'s, ``_made_id``), the
    client's deadline leaving it ``remaining_s`` (None: it set none), ``retried`` when the call
    is already a retry of the client channel's policy (``channel_retried``):

    - ``NO_RETRY`` once a model call of it was billed without its answer (cut mid-answer,
      broken off, at its deadline: ``call.bills``), whatever the status (the router's
      UNAVAILABLE after the replicas' hand-overs, a DEADLINE_EXCEEDED another client's policy
      may retry). A refusal before any model work (no replica, the outbox full, a hang before
      any start) stays retryable: a retry costs nothing but time.
    - a RESOURCE_EXHAUSTED here is never a tenant's limit (``_refuse`` sends those): it is the
      request's size, which no wait lifts (over a context window: the router's tiers, the
      simulator's count or a provider's refusal, each message naming the "context window";
      else over a provider's size limit or alone over its account's token rate), said by an
      ErrorInfo with no RetryInfo, so a client does not take it for a rate limit.
    - ``retry-after`` (whole seconds) on an UNAVAILABLE whose every replica's provider asked
      for a wait that outlasted the call (a 429's retry-after): the least of them, so that an
      HTTP caller's SDK waits as the provider asked rather than retrying at once; and gRPC's
      server pushback, so that the client's channel does too: that wait in ms while the
      client's deadline has room for it, it is ``MAX_PUSHBACK_S`` at most and the call is not
      already a retry of the channel's policy (its retry policy waits it, then retries, once),
      else ``NO_RETRY`` with a RetryInfo of that wait and the
      ErrorInfo ``UPSTREAM_RATE_LIMITED`` (not billed: the HTTP front answers it as before).
      Before, the channel retried at once: 4 retries of a 30 s wait in ~3.75 s, 5 calls to
      the providers that asked it; then it waited the wait before each of its 4 retries (a
      6 s wait held a 30 s-deadline caller ~24 s for 5 provider calls): now it waits once.
    - on an UNAVAILABLE after every replica tried had retried its provider (``exc.retried``:
      their 529s, 503s), ``NO_RETRY`` too, with a RetryInfo of that wait and the ErrorInfo
      ``UPSTREAM_RETRIED`` (which tells it from a billed call's): retries are the replicas'
      alone, bounded by ``PROVIDER_MAX_RETRIES``; the client's policy (and, from the HTTP
      front, an SDK's: x-should-retry: false) retrying each would multiply them (3 tries a
      replica times 3 SDK attempts: 9 provider calls for one create(); the client's 5: 15)."""
    trailers: list[tuple[str, str | bytes]] = [NO_RETRY] if call.bills else []
    if exc.retry_after_s is not None:  # the providers' wait (every replica's rate limited)
        trailers.append((RETRY_AFTER_KEY, str(exc.retry_after_s)))
        if exc.retried and not call.bills:  # (a billed one says so, final too)
            trailers.append(NO_RETRY)
            trailers.extend(
                pushback_trailers(exc.code, exc.message, exc.retry_after_s, UPSTREAM_RETRIED)
            )
        elif not call.bills:  # a provider's wait: the channel's retry waits it, or none
            waited = NO_RETRY if retried else _waited(exc.retry_after_s, remaining_s)
            trailers.append(waited)
            if waited == NO_RETRY:  # said why, or a front would read it as billed
                trailers.extend(
                    pushback_trailers(
                        exc.code, exc.message, exc.retry_after_s, UPSTREAM_RATE_LIMITED
                    )
                )
    if exc.code == Code.RESOURCE_EXHAUSTED:
        reason = CONTEXT_WINDOW if "context window" in exc.message else REQUEST_TOO_LARGE
        trailers.extend(refusal_trailers(exc.code, exc.message, reason))
    return (*trailers, *made_id)


def _waited(wait_s: int, remaining_s: float | None) -> tuple[str, str]:
    """gRPC's server pushback for a refusal whose providers asked for ``wait_s``: that wait
    (ms), when it is ``MAX_PUSHBACK_S`` at most and the client's deadline (``remaining_s`` left
    of it; None: none) has room for it and a try after it, else no retry (a retry waiting past
    the deadline ended the call DEADLINE_EXCEEDED, the wait the caller could have been told
    lost; a longer wait held the caller for each of its retries)."""
    if wait_s > MAX_PUSHBACK_S:
        return NO_RETRY
    if remaining_s is None or remaining_s > wait_s + _PUSHBACK_ROOM_S:
        return (PUSHBACK_KEY, str(wait_s * 1000))
    return NO_RETRY
