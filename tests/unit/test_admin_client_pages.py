"""``AdminClient`` against a fake router (a real gRPC server in this process): it follows the
pages of ListKeys, GetStats and ListLimits, and a reply over gRPC's message limit is said to
be one, not a rate limit."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from cachemesh import MessageTooLargeError, RateLimitError
from cachemesh._errors import from_rpc_error
from cachemesh.admin import AdminClient
from cachemesh.loadtest.billed import BilledUnavailable, StackTotals
from cachemesh.v1 import admin_pb2 as adm
from cachemesh.v1 import admin_pb2_grpc

TOKEN = "admin-token-for-the-unit-tests-0123"
KEYS = 2_500
MIB = 1 << 20


class FakeRouter(admin_pb2_grpc.AdminServicer):
    """Pages of ``size`` rows by index (the token); ``paged`` False: a router without pages
    (everything in one reply); ``unknown``: tenants whose totals did not come."""

    def __init__(self) -> None:
        self.paged = True
        self.requests: list[Any] = []
        self.unknown: set[str] = set()
        self.stuck = False  # answers the same next_page_token again
        self.keys = KEYS

    def _page(self, request: Any, total: int) -> tuple[range, str]:
        self.requests.append(request)
        if not self.paged:
            return range(total), ""
        start = int(request.page_token or 0)
        end = min(start + (request.page_size or 1000), total)
        more = end < total or self.stuck
        return range(start, end), (str(start if self.stuck else end) if more else "")

    def ListKeys(self, request: adm.ListKeysRequest, context: Any) -> adm.ListKeysResponse:
        rows, token = self._page(request, self.keys)
        keys = [
            adm.ApiKeyInfo(id=f"key_{i:012d}", tenant=f"tenant-{i % 9}", name="alice laptop")
            for i in rows
        ]
        return adm.ListKeysResponse(keys=keys, next_page_token=token)

    def GetStats(self, request: adm.GetStatsRequest, context: Any) -> adm.GetStatsResponse:
        rows, token = self._page(request, 2_050)
        reply = adm.GetStatsResponse(next_page_token=token)
        for i in rows:
            row = reply.tenants.add(tenant=f"t{i:05d}", model_requests=1, cost_nanos=10)
            if row.tenant in self.unknown:
                row.model_requests = row.cost_nanos = 0
                row.unavailable.append("prefix-cache")
        if any(row.unavailable for row in reply.tenants):
            reply.unavailable.append("prefix-cache")
        return reply

    def ListLimits(self, request: adm.ListLimitsRequest, context: Any) -> adm.ListLimitsResponse:
        rows, token = self._page(request, 2_300)
        reply = adm.ListLimitsResponse(next_page_token=token)
        reply.defaults.requests_per_min.value = 600
        for i in rows:
            reply.tenants.add(tenant=f"t{i:05d}").requests_per_min.CopyFrom(
                adm.Limit(value=i + 1, own=True)
            )
        return reply

    def RotateKey(self, request: adm.RotateKeyRequest, context: Any) -> adm.IssuedKey:
        self.requests.append(request)
        return adm.IssuedKey(key=adm.ApiKeyInfo(id=request.id))

    def RevokeKey(self, request: adm.RevokeKeyRequest, context: Any) -> adm.ApiKeyInfo:
        self.requests.append(request)
        return adm.ApiKeyInfo(id=request.id)


@pytest.fixture
def router() -> Iterator[tuple[FakeRouter, str]]:
    fake = FakeRouter()  # type: ignore[abstract]  # only the paged calls
    # the router's send limit is gRPC's default receive limit: 4 MiB
    server = grpc.server(
        futures.ThreadPoolExecutor(2), options=[("grpc.max_send_message_length", 4 * MIB)]
    )
    admin_pb2_grpc.add_AdminServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield fake, f"127.0.0.1:{port}"
    server.stop(None)


def test_every_page_of_keys_and_stats_is_followed(router: tuple[FakeRouter, str]) -> None:
    fake, target = router
    with AdminClient(target, admin_token=TOKEN) as client:
        keys = client.list_keys(include_revoked=True)
        assert [k.id for k in keys] == [f"key_{i:012d}" for i in range(KEYS)]
        assert [r.page_token for r in fake.requests] == ["", "1000", "2000"]
        assert all(r.include_revoked for r in fake.requests)
        # an explicit page_size, always: a request without one is a client's from before
        # pages, which the router answers whole (or refuses)
        assert [r.page_size for r in fake.requests] == [1000] * 3
        fake.requests.clear()
        client.stats()
        assert [r.page_size for r in fake.requests] == [1000] * 3
        fake.requests.clear()
        stats = client.stats(page_size=700)
        assert len(stats.tenants) == 2_050 and not stats.unavailable
        assert [r.page_size for r in fake.requests] == [700] * 3
        fake.paged = False  # an older router: its one reply
        assert len(client.list_keys()) == KEYS


def test_every_page_of_limits_is_followed(router: tuple[FakeRouter, str]) -> None:
    """ListLimits was one reply of every tenant with limits of its own: ~60,000 such tenants
    (28-character names, every limit set) failed RESOURCE_EXHAUSTED "Received message larger
    than max (4800020 vs. 4194304)" in `cachemesh admin limits list`."""
    fake, target = router
    with AdminClient(target, admin_token=TOKEN) as client:
        listed = client.list_limits()
        assert [t.tenant for t in listed.tenants] == [f"t{i:05d}" for i in range(2_300)]
        assert listed.tenants[-1].requests_per_min == adm.Limit(value=2_300, own=True)
        assert listed.defaults.requests_per_min.value == 600
        assert [r.page_token for r in fake.requests] == ["", "1000", "2000"]
        assert [r.page_size for r in fake.requests] == [1000] * 3
        fake.requests.clear()
        assert len(client.list_limits(page_size=900).tenants) == 2_300
        assert [r.page_size for r in fake.requests] == [900] * 3
        fake.paged = False  # an older router: its one reply
        assert len(client.list_limits().tenants) == 2_300


def test_a_router_repeating_its_page_token_is_an_error_not_a_loop(
    router: tuple[FakeRouter, str],
) -> None:
    fake, target = router
    fake.stuck = True
    with AdminClient(target, admin_token=TOKEN) as client, pytest.raises(Exception) as error:
        client.list_keys()
    assert "same next_page_token" in str(error.value)


def test_the_load_testers_totals_read_every_page_and_refuse_unknown_ones(
    router: tuple[FakeRouter, str],
) -> None:
    """cachemesh-load read GetStats(all) once: on a stack of ~6,000+ tenants prefix-cache's
    totals ran out their deadline and the read always failed (BilledUnavailable)."""
    fake, target = router
    totals = StackTotals(target, TOKEN)()
    assert (totals.model_requests, totals.cost_nanos) == (2_050, 20_500)
    fake.unknown = {"t01500", "t01501"}
    with pytest.raises(BilledUnavailable, match="totals of 2 of 2050 tenants unknown"):
        StackTotals(target, TOKEN)()


def test_a_reply_over_the_message_limit_is_not_a_rate_limit(
    router: tuple[FakeRouter, str],
) -> None:
    """~89,000 keys in one ListKeys reply: RESOURCE_EXHAUSTED "SERVER: Sent message larger
    than max (4413096 vs. 4194304)", which the client raised as RateLimitError (every
    RESOURCE_EXHAUSTED was one): a caller would wait and retry, for ever."""
    fake, target = router
    fake.paged = False
    fake.keys = 100_000
    with (
        AdminClient(target, admin_token=TOKEN) as client,
        pytest.raises(MessageTooLargeError) as error,
    ):
        client.list_keys()
    too_large = error.value
    assert not isinstance(too_large, RateLimitError)
    assert too_large.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert too_large.limit_bytes == 4 * MIB and (too_large.size_bytes or 0) > 4 * MIB
    assert "page_size" in too_large.message and "not a rate limit" in too_large.message
    assert "Sent message larger than max" in too_large.message


@pytest.mark.parametrize(
    ("details", "size"),
    [
        ("SERVER: Sent message larger than max (4413096 vs. 4194304)", 4413096),
        ("Received message larger than max (5000000 vs. 4194304)", 5000000),
        ("CLIENT: Sent message larger than max", None),
    ],
)
def test_grpcs_message_limit_is_told_from_a_rate_limit(details: str, size: int | None) -> None:
    def error(said: str) -> grpc.aio.AioRpcError:
        return grpc.aio.AioRpcError(
            grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), grpc.aio.Metadata(), said
        )

    too_large = from_rpc_error(error(details))
    assert type(too_large) is MessageTooLargeError and too_large.size_bytes == size
    limited = from_rpc_error(error("tenant acme: 60 requests a minute; retry in 12 s"))
    assert type(limited) is RateLimitError


def test_a_rotation_sends_the_key_as_seen(router: tuple[FakeRouter, str]) -> None:
    """``rotate_key(seen=...)``: the key's rotated_at as a reply gave it, or that it was
    never rotated; without ``seen`` neither (rotated whatever came before)."""
    fake, target = router
    rotated = adm.ApiKeyInfo(id="key_1")
    rotated.rotated_at.FromNanoseconds(1_780_000_000_123_456_789)
    with AdminClient(target, admin_token=TOKEN) as client:
        client.rotate_key("key_1", seen=rotated)
        client.rotate_key("key_1", seen=adm.ApiKeyInfo(id="key_1"))
        client.rotate_key("key_1")
    sent = [(r.WhichOneof("if_unchanged"), r.if_rotated_at.ToNanoseconds()) for r in fake.requests]
    assert sent == [
        ("if_rotated_at", 1_780_000_000_123_456_789),
        ("if_never_rotated", 0),
        (None, 0),
    ]
    assert fake.requests[1].if_never_rotated


def test_a_revocation_sends_the_key_as_seen(router: tuple[FakeRouter, str]) -> None:
    """``revoke_key(seen=...)``: as ``rotate_key``'s (main: revoke_key took no ``seen``)."""
    fake, target = router
    rotated = adm.ApiKeyInfo(id="key_1")
    rotated.rotated_at.FromNanoseconds(1_780_000_000_123_456_789)
    with AdminClient(target, admin_token=TOKEN) as client:
        client.revoke_key("key_1", seen=rotated)
        client.revoke_key("key_1", seen=adm.ApiKeyInfo(id="key_1"))
        client.revoke_key("key_1")
    sent = [(r.WhichOneof("if_unchanged"), r.if_rotated_at.ToNanoseconds()) for r in fake.requests]
    assert sent == [
        ("if_rotated_at", 1_780_000_000_123_456_789),
        ("if_never_rotated", 0),
        (None, 0),
    ]
    assert all(type(r) is adm.RevokeKeyRequest for r in fake.requests)
    assert fake.requests[1].if_never_rotated
