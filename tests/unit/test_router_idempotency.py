"""Answer-once by request_id: the first call runs, the others get its answer."""

from __future__ import annotations

import pytest

from cachemesh.v1 import gateway_pb2 as pb
from services.common.clock import ManualClock
from services.router.idempotency import IdempotencyConflict, IdempotencyTable


def _req(request_id: str, text: str = "hi") -> pb.CompleteRequest:
    return pb.CompleteRequest(
        model="auto",
        max_tokens=10,
        request_id=request_id,
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=text)])],
    )


async def test_second_claim_waits_for_the_first_answer() -> None:
    table = IdempotencyTable(ManualClock(), ttl_s=60, max_records=10)
    first, future = table.claim("t", _req("r1"))
    second, same = table.claim("t", _req("r1"))
    assert first and not second and same is future
    future.set_result(pb.CompleteResponse(request_id="r1", model="sim-small"))
    assert (await same).model == "sim-small"


async def test_ids_are_scoped_by_tenant() -> None:
    table = IdempotencyTable(ManualClock(), ttl_s=60, max_records=10)
    assert table.claim("a", _req("r1"))[0]
    assert table.claim("b", _req("r1"))[0]


async def test_same_id_for_a_different_request_is_refused() -> None:
    table = IdempotencyTable(ManualClock(), ttl_s=60, max_records=10)
    table.claim("t", _req("r1", "hello"))
    with pytest.raises(IdempotencyConflict, match="request_id"):
        table.claim("t", _req("r1", "something else"))


async def test_release_lets_a_retry_run() -> None:
    table = IdempotencyTable(ManualClock(), ttl_s=60, max_records=10)
    _, first = table.claim("t", _req("r1"))
    table.release("t", "r1", first)
    assert table.claim("t", _req("r1"))[0]
    table.release("t", "r1", first)  # a late release of the first call: not the retry's record
    assert not table.claim("t", _req("r1"))[0]


async def test_records_expire_after_the_ttl() -> None:
    clock = ManualClock()
    table = IdempotencyTable(clock, ttl_s=60, max_records=10)
    _, future = table.claim("t", _req("r1"))
    future.set_result(pb.CompleteResponse())
    clock.advance(s=59)
    assert not table.claim("t", _req("r1"))[0]
    clock.advance(s=2)
    assert table.claim("t", _req("r1"))[0]


async def test_table_is_bounded() -> None:
    table = IdempotencyTable(ManualClock(), ttl_s=60, max_records=2)
    for i in range(3):
        table.claim("t", _req(f"r{i}"))[1].set_result(pb.CompleteResponse())
        table.kept()  # as the servicer does when it keeps an answer
    assert len(table) == 2
    assert table.claim("t", _req("r0"))[0]  # the oldest was dropped


async def test_a_call_still_running_is_never_dropped_by_the_bound() -> None:
    """A retry of a running call awaits it: dropping its record would run the model again."""
    table = IdempotencyTable(ManualClock(), ttl_s=60, max_records=2)
    _, running = table.claim("t", _req("r0"))
    for i in (1, 2, 3):  # two answers fit: the third pushes the oldest answer out
        table.claim("t", _req(f"r{i}"))[1].set_result(pb.CompleteResponse())
        table.kept()
    claimed, same = table.claim("t", _req("r0"))
    assert not claimed and same is running
    assert table.claim("t", _req("r1"))[0]  # the oldest answered one went instead
    assert not table.claim("t", _req("r2"))[0]  # running calls do not count against the bound


async def test_a_call_still_running_does_not_keep_expired_answers_alive() -> None:
    """The expiry stepped no further than the oldest running call: an hour-long stream kept
    every later answer past its TTL (replayed an hour on, a new request under its id refused)."""
    clock = ManualClock()
    table = IdempotencyTable(clock, ttl_s=60, max_records=1000)
    table.claim("t", _req("long"))  # a long stream, still running
    for i in range(3):
        table.claim("t", _req(f"r{i}"))[1].set_result(pb.CompleteResponse())
        table.kept()
    clock.advance(s=3600)
    assert table.claim("t", _req("r0"))[0]  # expired: a new call
    assert not table.claim("t", _req("long"))[0]  # the running one is still awaited
