"""A provider answering 529 (or 503) to every try: the chain retries it once, at the replica.

Measured on the provider stack (an SDK's create() with its default retries, the provider
answering 529 to every call): 9 provider calls in 1.77 s (the replica's 3 tries, times the
SDK's 3 attempts; two replicas: 18), and 15 from the Python gRPC client (its channel's 5
attempts). Now the replica that spent its ``PROVIDER_MAX_RETRIES`` marks its refusal
(``cachemesh-retried``, with the wait its next backoff would have been as ``retry-after``);
the router, when every replica tried was so, ends the call with gRPC's server pushback
``-1``, a RetryInfo of that wait and the ErrorInfo ``UPSTREAM_RETRIED``; the HTTP front
answers 529 / 503 with that retry-after and ``x-should-retry: false``; the client's channel
does not retry, and its ``UnavailableError`` carries the wait. One create(): 3 provider calls.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

import anthropic
import grpc
import httpx2
import pytest

from cachemesh import UnavailableError
from cachemesh._errors import from_rpc_error
from cachemesh.retry_info import PUSHBACK_KEY, UPSTREAM_RETRIED, error_reason, retry_delay_s
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from services.common.errors import Code, RequestError
from services.common.models import ModelSpec
from services.common.retry_info import pushback_trailers
from services.common.tokens import Tokenizer, load_cl100k
from services.http_front.errors import BILLED
from services.http_front.gateway import api_error
from services.model.providers.progress import Progress
from services.model.servicer import _trailers as replica_trailers
from services.router.access_log import Call
from services.router.call_trailers import NO_RETRY
from services.router.call_trailers import failed_call_trailers as router_trailers
from services.router.dependencies import CallFailed
from services.router.grpc_adapters import failed
from tests.unit.test_provider_deadline import Clock, _api, _drain
from tests.unit.test_router_replica_ejection import Clock as RouterClock
from tests.unit.test_router_replica_ejection import Models, _ask, _ask_auto, _pipeline


def _overloaded(status: int, retry_after: str | None) -> anthropic.APIStatusError:
    kind = "overloaded_error" if status == 529 else "api_error"
    body = {"type": "error", "error": {"type": kind, "message": "Overloaded"}}
    request = httpx2.Request("POST", "http://127.0.0.1:1/v1/messages")
    headers = {"retry-after": retry_after} if retry_after is not None else {}
    response = httpx2.Response(status, headers=headers, json=body, request=request)
    if status == 529:
        return anthropic.OverloadedError("Overloaded", response=response, body=body)
    return anthropic.InternalServerError("Overloaded", response=response, body=body)


@dataclass
class AlwaysOverloaded:
    """Answers ``status`` to every call (with ``retry_after``, if any)."""

    status: int
    retry_after: str | None = None
    backend: str = "anthropic"
    calls: list[float] = field(default_factory=list)

    async def stream(
        self, spec: ModelSpec, request: pb.CompleteRequest, progress: Progress, timeout_s: float
    ) -> AsyncGenerator[model_pb2.GenerateChunk, None]:
        self.calls.append(timeout_s)
        raise _overloaded(self.status, self.retry_after)
        yield model_pb2.GenerateChunk()  # (an async generator, as the adapters' streams are)

    async def close(self) -> None:
        return None


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_cl100k()


@pytest.mark.parametrize(
    ("status", "retry_after", "told"),
    [
        (529, None, 2),  # the 4th try's backoff: 0.5 s, 1 s, then 2 s (PROVIDER_BACKOFF_S 0.5)
        (503, None, 2),
        (529, "0.2", 1),  # the provider's own wait, in whole seconds
    ],
)
async def test_a_replica_that_spent_its_retries_says_so_with_its_next_wait(
    tokenizer: Tokenizer, status: int, retry_after: str | None, told: int
) -> None:
    clock = Clock()
    adapter = AlwaysOverloaded(status, retry_after)
    with pytest.raises(RequestError) as caught:
        await _drain(_api(adapter, clock, tokenizer), time_remaining_s=60.0)  # type: ignore[arg-type]
    assert len(adapter.calls) == 3  # PROVIDER_MAX_RETRIES 2: three tries, no more
    assert caught.value.code == Code.UNAVAILABLE
    assert caught.value.retried
    assert caught.value.retry_after_s == told
    assert ("cachemesh-retried", "1") in replica_trailers(caught.value)
    assert ("retry-after", str(told)) in replica_trailers(caught.value)


async def test_a_replica_that_handed_over_with_retries_left_does_not_say_so(
    tokenizer: Tokenizer,
) -> None:
    """A retry-after past the deadline: no retry made, its caller may try elsewhere."""
    adapter = AlwaysOverloaded(529, "30")
    with pytest.raises(RequestError) as caught:
        await _drain(_api(adapter, Clock(), tokenizer), time_remaining_s=5.0)  # type: ignore[arg-type]
    assert len(adapter.calls) == 1
    assert not caught.value.retried and caught.value.retry_after_s == 30
    assert ("cachemesh-retried", "1") not in replica_trailers(caught.value)


@dataclass
class OverloadedOnce(AlwaysOverloaded):
    """Answers ``status`` to its first call, then a one-word answer (a transient 529)."""

    async def stream(
        self, spec: ModelSpec, request: pb.CompleteRequest, progress: Progress, timeout_s: float
    ) -> AsyncGenerator[model_pb2.GenerateChunk, None]:
        self.calls.append(timeout_s)
        if len(self.calls) == 1:
            raise _overloaded(self.status, self.retry_after)
        yield model_pb2.GenerateChunk(text="Paris")


@pytest.mark.parametrize(("retry_after", "told"), [(None, None), ("3", 3)])
async def test_a_replica_whose_retries_are_off_hands_retrying_back_to_its_callers(
    tokenizer: Tokenizer, retry_after: str | None, told: int | None
) -> None:
    """PROVIDER_MAX_RETRIES=0: the replica's one try is no retry, so its refusal is not
    marked retried (it was: 'after 1 tries', cachemesh-retried, and nothing in the chain
    retried a transient 529 that the next call would have passed). The router, the HTTP
    front and the client then retry it as before; the provider's own retry-after still
    reaches them."""
    adapter = OverloadedOnce(529, retry_after)
    api = _api(adapter, Clock(), tokenizer)  # type: ignore[arg-type]
    api._s = dataclasses.replace(api._s, max_retries=0)
    with pytest.raises(RequestError) as caught:
        await _drain(api, time_remaining_s=60.0)
    err = caught.value
    assert len(adapter.calls) == 1
    assert not err.retried and err.retry_after_s == told
    assert "after 1 try (this replica's retries are off)" in err.reason
    assert "1 tries" not in err.message
    assert ("cachemesh-retried", "1") not in replica_trailers(err)
    # through the router (both replicas refused so): retryable, no pushback -1
    both = failed(_rpc_error(replica_trailers(err)))
    models = Models(RouterClock(), {"large-1": both, "large-2": both})
    with pytest.raises(RequestError) as routed:
        await _ask(_pipeline(models), 1)
    assert not routed.value.retried
    trailers = router_trailers(Call("Complete", 0.0), routed.value)
    assert NO_RETRY not in trailers and (PUSHBACK_KEY, "-1") not in trailers
    assert "x-should-retry" not in api_error(_rpc_error(trailers)).headers()
    assert (await _drain(api, time_remaining_s=60.0)) == ["text"]  # the caller's retry: served


@pytest.mark.parametrize("auto", [False, True], ids=["other-replica", "other-tier"])
async def test_a_replica_that_spent_its_retries_hands_over_to_one_that_answers(
    auto: bool,
) -> None:
    """One replica spent its provider's retries (cachemesh-retried): the router still hands
    the request to its other replica (``auto``: the other tier), and the caller gets that
    answer; only a call every replica refused so is told not to retry."""
    if auto:
        models = Models(RouterClock(), {"small-1": _spent(2)})
        answer = await _ask_auto(_pipeline(models), 1, threshold=1.0)
        assert models.calls == ["small-1", "large-1"] and answer.model == "sim-large"
    else:
        models = Models(RouterClock(), {"large-1": _spent(2)})
        answer = await _ask(_pipeline(models), 1)
        assert models.calls == ["large-1", "large-2"]
    assert answer.content[0].text == "ok"


def _rpc_error(trailers: tuple[tuple[str, str | bytes], ...]) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(*trailers), "no"
    )


def test_the_router_reads_a_replicas_retried_mark() -> None:
    assert failed(_rpc_error((("retry-after", "4"), ("cachemesh-retried", "1")))).retried
    assert not failed(_rpc_error((("retry-after", "4"),))).retried
    assert not failed(_rpc_error((("cachemesh-retried", "0"),))).retried


def _spent(wait_s: int, retried: bool = True, *, by_provider: bool | None = None) -> CallFailed:
    """A replica's refusal: its retries spent, ``wait_s`` its next backoff (``by_provider``:
    its provider's retry-after); or not ``retried``, handed over for its provider's wait."""
    return CallFailed(
        Code.UNAVAILABLE,
        "anthropic could not serve (529 overloaded_error: Overloaded); after 3 tries",
        "anthropic 529 overloaded_error; after 3 tries",
        retry_after_s=wait_s,
        retried=retried,
        backoff_wait=not by_provider if by_provider is not None else retried,
    )


@pytest.mark.parametrize(
    ("second", "spent", "told"),
    [
        (_spent(2), True, 1),  # both replicas retried their providers: no retry, the least wait
        # one handed over for its provider's wait (2 s, longer than large-1's backoff): retryable
        (_spent(2, retried=False), False, 2),
    ],
)
async def test_the_routers_refusal_is_retried_only_when_every_replica_retried(
    second: CallFailed, spent: bool, told: int
) -> None:
    models = Models(RouterClock(), {"large-1": _spent(1), "large-2": second})
    with pytest.raises(RequestError) as caught:
        await _ask(_pipeline(models), 1)
    assert sorted(models.calls) == ["large-1", "large-2"]  # each replica once: no retry
    assert caught.value.code == Code.UNAVAILABLE and caught.value.retry_after_s == told
    assert caught.value.retried == spent
    assert ("retried already: retry in 1 s at the earliest" in caught.value.message) == spent


@pytest.mark.parametrize(
    ("first", "second", "told", "words"),
    [
        # the reviewer's case: large-1 spent its retries (its backoff, 2 s); large-2's provider
        # asked 30 s of quiet (a 429 past the deadline): the provider's 30 s, said as its own
        # (before: 2 s, "as the provider asked")
        (_spent(2), _spent(30, retried=False), 30, "retry later (in 30 s, as the provider asked)"),
        # a provider's wait shorter than the other replica's backoff: the larger, the backoff's
        (_spent(4), _spent(1, retried=False), 4, "(in 4 s, a replica's backoff after its retries)"),
        # both spent on their backoffs: no provider asked anything
        (_spent(2), _spent(4), 2, "retry in 2 s at the earliest; "),
        # both spent, a provider's own retry-after among them: said as the provider's
        (
            _spent(1),
            _spent(3, by_provider=True),
            3,
            "retry in 3 s at the earliest (as the provider asked)",
        ),
    ],
    ids=["reviewers-mix", "backoff-longer", "both-backoffs", "spent-provider-wait"],
)
async def test_the_routers_wait_says_where_it_came_from(
    first: CallFailed, second: CallFailed, told: int, words: str
) -> None:
    models = Models(RouterClock(), {"large-1": first, "large-2": second})
    with pytest.raises(RequestError) as caught:
        await _ask(_pipeline(models), 1)
    message = caught.value.message + "; "
    assert caught.value.retry_after_s == told
    assert words in message
    if "provider asked" not in words:
        assert "provider asked" not in message


@pytest.mark.parametrize(
    ("retry_after", "source"), [(None, "backoff"), ("3", "provider")], ids=["backoff", "provider"]
)
async def test_a_replica_says_where_its_wait_came_from_and_the_router_reads_it(
    tokenizer: Tokenizer, retry_after: str | None, source: str
) -> None:
    with pytest.raises(RequestError) as caught:
        api = _api(AlwaysOverloaded(529, retry_after), Clock(), tokenizer)  # type: ignore[arg-type]
        await _drain(api, time_remaining_s=60.0)
    trailers = replica_trailers(caught.value)
    assert ("cachemesh-retry-after-from", source) in trailers
    assert failed(_rpc_error(trailers)).backoff_wait == (source == "backoff")


def test_a_replica_from_before_the_source_trailer_is_read_as_it_meant() -> None:
    """Before 592534a a replica's retry-after was only its provider's; a 592534a replica's
    marked retried may be its backoff: read so, no message claims the provider asked."""
    assert not failed(_rpc_error((("retry-after", "30"),))).backoff_wait
    old_spent = (("retry-after", "2"), ("cachemesh-retried", "1"))
    assert failed(_rpc_error(old_spent)).backoff_wait


def _refusal() -> RequestError:
    return RequestError(
        Code.UNAVAILABLE, "no model replica could serve", retry_after_s=4, retried=True
    )


def test_the_routers_spent_refusal_pushes_back_with_its_wait_and_why() -> None:
    trailers = router_trailers(Call("Complete", 0.0), _refusal())
    assert NO_RETRY in trailers  # the client's channel does not retry it
    assert ("retry-after", "4") in trailers
    assert retry_delay_s(trailers) == 4.0
    assert error_reason(trailers) == UPSTREAM_RETRIED


def test_the_http_front_tells_the_sdk_to_wait_and_not_retry() -> None:
    trailers = router_trailers(Call("Complete", 0.0), _refusal())
    error = api_error(_rpc_error(trailers))
    assert error.status_for("anthropic") == 529 and error.status_for("openai") == 503
    assert error.headers() == {"retry-after": "4", "x-should-retry": "false"}
    assert BILLED not in error.message  # not a billed call's refusal


def test_a_billed_call_still_says_billed() -> None:
    """A call billed on one replica and refused by another keeps the billed refusal."""
    message = "no model replica could serve"
    billed = (NO_RETRY, ("retry-after", "4"))  # what the router sends for it (no ErrorInfo)
    error = api_error(_rpc_error(billed))
    assert BILLED in error.message and error.headers()["x-should-retry"] == "false"
    spent: tuple[tuple[str, str | bytes], ...] = (
        NO_RETRY,
        *pushback_trailers(Code.UNAVAILABLE, message, 4, UPSTREAM_RETRIED),
    )
    assert BILLED not in api_error(_rpc_error(spent)).message


def test_the_client_carries_the_wait_on_its_unavailable_error() -> None:
    trailers = router_trailers(Call("Complete", 0.0), _refusal())
    error = from_rpc_error(_rpc_error(trailers), "r1")
    assert isinstance(error, UnavailableError)
    assert error.retry_after_s == 4.0 and error.reason == UPSTREAM_RETRIED
    assert (PUSHBACK_KEY, "-1") in trailers
    # a provider's 429 wait the router sends alone (a retry-after trailer, no RetryInfo)
    alone = from_rpc_error(_rpc_error((("retry-after", "30"),)), "r2")
    assert isinstance(alone, UnavailableError) and alone.retry_after_s == 30.0
    assert alone.reason is None
    assert from_rpc_error(_rpc_error(()), "r3").retry_after_s is None  # type: ignore[attr-defined]
