"""A request every replica refused because its provider rate limited it past the call's deadline
(a 429 whose retry-after outlasts it): the router's UNAVAILABLE carries the providers' wait, the
least of them, as a ``retry-after`` trailer, which the HTTP front sends on to the SDKs. Before,
the wait stopped at the replica: the front answered 529 / 503 with no retry-after and the SDKs
retried at once, three calls to a provider in 1.7 s that had asked for 30 s of quiet."""

from __future__ import annotations

import grpc
import pytest

from services.common.errors import Code, RequestError
from services.router.dependencies import CallFailed
from services.router.grpc_adapters import failed
from tests.unit.test_router_replica_ejection import Clock, Models, _ask, _pipeline


def _limited(wait_s: int | None) -> CallFailed:
    return CallFailed(
        Code.UNAVAILABLE,
        "anthropic could not serve (429 rate_limit_error: slow down)",
        "anthropic 429 rate_limit_error; its retry-after outlasts the request's deadline",
        retry_after_s=wait_s,
    )


@pytest.mark.parametrize(
    ("waits", "told"),
    [
        ((30, 12), 12),  # the first replica free again
        ((30, None), None),  # one failed otherwise (no wait said): no wait is known
        ((None, None), None),
    ],
)
async def test_the_routers_refusal_carries_the_least_of_the_providers_waits(
    waits: tuple[int | None, int | None], told: int | None
) -> None:
    models = Models(Clock(), {"large-1": _limited(waits[0]), "large-2": _limited(waits[1])})
    with pytest.raises(RequestError) as caught:
        await _ask(_pipeline(models), 1)
    assert caught.value.code == Code.UNAVAILABLE
    assert sorted(models.calls) == ["large-1", "large-2"]
    assert caught.value.retry_after_s == told
    assert (f"in {told} s, as the provider asked" in caught.value.message) == (told is not None)


def _rpc_error(trailers: tuple[tuple[str, str], ...]) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(*trailers), "no"
    )


@pytest.mark.parametrize(
    ("value", "read"),
    [
        ("30", 30),
        ("1", 1),
        ("0", None),
        ("-5", None),
        ("1.5", None),
        ("soon", None),
        ("99999999999", None),
        ("٣", None),
    ],
)
def test_a_replicas_retry_after_trailer_is_read_as_whole_seconds_or_not_at_all(
    value: str, read: int | None
) -> None:
    assert failed(_rpc_error((("retry-after", value),))).retry_after_s == read
    assert failed(_rpc_error(())).retry_after_s is None
