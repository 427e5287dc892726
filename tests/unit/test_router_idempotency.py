"""Answer-once by request_id: the first call runs, the others get its answer."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from cachemesh.v1 import gateway_pb2 as pb
from services.common.clock import ManualClock
from services.common.env import ConfigError, Env
from services.router.idempotency import DEFAULT_MAX_BYTES, IdempotencyConflict, IdempotencyTable
from services.router.settings import idempotency_max_bytes


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
        table.kept("t", f"r{i}")  # as the servicer does when it keeps an answer
    assert len(table) == 2
    assert table.claim("t", _req("r0"))[0]  # the oldest was dropped


async def test_a_call_still_running_is_never_dropped_by_the_bound() -> None:
    """A retry of a running call awaits it: dropping its record would run the model again."""
    table = IdempotencyTable(ManualClock(), ttl_s=60, max_records=2)
    _, running = table.claim("t", _req("r0"))
    for i in (1, 2, 3):  # two answers fit: the third pushes the oldest answer out
        table.claim("t", _req(f"r{i}"))[1].set_result(pb.CompleteResponse())
        table.kept("t", f"r{i}")
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
        table.kept("t", f"r{i}")
    clock.advance(s=3600)
    assert table.claim("t", _req("r0"))[0]  # expired: a new call
    assert not table.claim("t", _req("long"))[0]  # the running one is still awaited


def _answer(request_id: str, words: int) -> pb.CompleteResponse:
    text = " ".join(f"w{i}" for i in range(words))
    return pb.CompleteResponse(content=[pb.ContentBlock(text=text)], request_id=request_id)


async def test_the_table_is_bounded_by_its_answers_bytes_the_oldest_answered_out_first() -> None:
    """Bounded by count only, 100,000 whole answers held 2.2 GiB at 4k-token answers: the
    answers' serialized bytes are bounded too, the oldest answered records dropped first."""
    size = _answer("r0", 400).ByteSize()
    table = IdempotencyTable(ManualClock(), ttl_s=60, max_records=1000, max_bytes=3 * size)
    _, running = table.claim("t", _req("long"))  # still running: never dropped, never counted
    for i in range(5):
        table.claim("t", _req(f"r{i}"))[1].set_result(_answer(f"r{i}", 400))
        table.kept("t", f"r{i}")
        assert table.held_bytes <= 3 * size
    assert table.held_bytes == 3 * size
    assert table.claim("t", _req("r0"))[0] and table.claim("t", _req("r1"))[0]  # the oldest went
    assert not any(table.claim("t", _req(f"r{i}"))[0] for i in (2, 3, 4))
    claimed, same = table.claim("t", _req("long"))
    assert not claimed and same is running


async def test_bytes_leave_the_count_when_records_expire_or_are_released() -> None:
    clock = ManualClock()
    size = _answer("r0", 100).ByteSize()
    table = IdempotencyTable(clock, ttl_s=60, max_records=1000, max_bytes=10 * size)
    _, failed = table.claim("t", _req("failed"))
    table.release("t", "failed", failed)
    for i in range(2):
        table.claim("t", _req(f"r{i}"))[1].set_result(_answer(f"r{i}", 100))
        table.kept("t", f"r{i}")
    assert table.held_bytes == 2 * size
    clock.advance(s=61)
    table.claim("t", _req("next"))  # expires the two answers
    assert table.held_bytes == 0


async def test_an_answer_larger_than_the_bound_is_not_kept_past_its_call() -> None:
    table = IdempotencyTable(ManualClock(), ttl_s=60, max_records=1000, max_bytes=0)
    _, future = table.claim("t", _req("r0"))
    waiting, same = table.claim("t", _req("r0"))  # a duplicate awaiting the running call
    future.set_result(_answer("r0", 10))
    table.kept("t", "r0")
    assert not waiting and (await same).request_id == "r0"  # it still got the answer
    assert table.held_bytes == 0 and len(table) == 0


def test_the_byte_bound_is_read_at_start_up() -> None:
    assert idempotency_max_bytes(Env({})) == DEFAULT_MAX_BYTES == 256 * 1024 * 1024
    assert idempotency_max_bytes(Env({"ROUTER_IDEMPOTENCY_MAX_BYTES": "0"})) == 0
    with pytest.raises(ConfigError, match="ROUTER_IDEMPOTENCY_MAX_BYTES must be >= 0, got -1"):
        idempotency_max_bytes(Env({"ROUTER_IDEMPOTENCY_MAX_BYTES": "-1"}))


async def test_another_tenants_flood_does_not_push_a_tenants_answer_out() -> None:
    """The bound was one queue for every tenant: tenant b's flood of answered requests pushed
    tenant a's answer out, and a's retry (unmarked, so the ledger is not asked) ran the model
    and was billed a second time. The tenant holding the most answers loses its oldest."""
    table = IdempotencyTable(ManualClock(), ttl_s=60, max_records=100)
    table.claim("a", _req("mine"))[1].set_result(pb.CompleteResponse(request_id="mine"))
    table.kept("a", "mine")
    for i in range(1000):  # b floods: ten times the bound
        table.claim("b", _req(f"b{i}"))[1].set_result(pb.CompleteResponse())
        table.kept("b", f"b{i}")
        assert len(table) <= 100
    claimed, same = table.claim("a", _req("mine"))  # a's retry
    assert not claimed and (await same).request_id == "mine"  # replayed, not billed again
    assert table.claim("b", _req("b0"))[0]  # b's oldest went, not a's
    assert not table.claim("b", _req("b999"))[0]


async def test_another_tenants_large_answers_do_not_push_a_tenants_answer_out() -> None:
    """The same by bytes: the bound takes from the tenant holding the most bytes."""
    size = _answer("x", 400).ByteSize()
    table = IdempotencyTable(ManualClock(), ttl_s=60, max_records=1000, max_bytes=10 * size)
    table.claim("a", _req("mine"))[1].set_result(_answer("x", 400))
    table.kept("a", "mine")
    for i in range(30):
        table.claim("b", _req(f"b{i}"))[1].set_result(_answer("x", 400))
        table.kept("b", f"b{i}")
        assert table.held_bytes <= 10 * size
    assert not table.claim("a", _req("mine"))[0]
    assert table.held_bytes == 10 * size


async def test_a_tenant_alone_has_the_whole_bound_and_tenants_share_it() -> None:
    """Each tenant is bounded only by what the others hold: alone, one has the whole table;
    beside another that floods, it keeps up to an even share."""
    table = IdempotencyTable(ManualClock(), ttl_s=60, max_records=10)
    for i in range(10):
        table.claim("a", _req(f"a{i}"))[1].set_result(pb.CompleteResponse())
        table.kept("a", f"a{i}")
    assert len(table) == 10
    for i in range(100):
        table.claim("b", _req(f"b{i}"))[1].set_result(pb.CompleteResponse())
        table.kept("b", f"b{i}")
    kept = [i for i in range(10) if not table.claim("a", _req(f"a{i}"))[0]]
    assert kept == [5, 6, 7, 8, 9]  # a's newest five: half the table, the oldest out first


async def test_the_router_s_table_ages_on_the_monotonic_clock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The table the router builds (``in_process``): a retry 5 s after its answer, the wall
    clock stepped forward a day meanwhile, ran the model again (its answer expired on the
    wall's 24 h TTL). The process's two clocks are faked where the clocks read them."""
    now = {"wall_ns": 1_700_000_000_000 * 1_000_000, "monotonic_ns": 0}
    fake = SimpleNamespace(time_ns=lambda: now["wall_ns"], monotonic_ns=lambda: now["monotonic_ns"])
    monkeypatch.setattr("services.common.clock.time", fake)
    table = IdempotencyTable.in_process(ttl_s=86_400, max_records=1000)
    run, future = table.claim("t", _req("r1"))
    assert run
    future.set_result(pb.CompleteResponse(request_id="r1"))
    table.kept("t", "r1")
    now["wall_ns"] += 86_400 * 1_000_000_000
    now["monotonic_ns"] += 5 * 1_000_000_000
    run, again = table.claim("t", _req("r1"))
    assert not run and again.result().request_id == "r1"
    now["monotonic_ns"] += 86_400 * 1_000_000_000  # a day of this process's time: expired
    assert table.claim("t", _req("r1"))[0]
