"""Commit records and totals shared by prefix-cache replicas: two cores on one ledger (the same
in-memory object, or two Redis clients of one real server) behave as one service. Every test
runs on both backends; time is the injected ManualClock, never a sleep."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import pytest
from redis.asyncio import Redis

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.clock import ManualClock
from services.common.models import ModelTable, load_model_table
from services.common.tokens import Tokenizer, load_cl100k
from services.prefix_cache.commit_records import MIN_RECORD_TTL_MS, CommitRecord, Final, Stood
from services.prefix_cache.core import (
    BadRequest,
    NoWarmCommit,
    PrefixCacheCore,
    TokenizerSlot,
    WarmModelUnknown,
)
from services.prefix_cache.ledger import CommitLedger
from services.prefix_cache.redis_ledger import RedisCommitLedger
from services.prefix_cache.redis_store import RedisWarmStore
from services.prefix_cache.replica_view import ReplicaViews
from services.prefix_cache.rules import Split
from services.prefix_cache.totals import TenantTotals
from services.prefix_cache.warm import WarmStore
from tests.redis_server import client_of
from tests.unit.conftest import LedgerFactory

TABLE = load_model_table()
TTL_MS = MIN_RECORD_TTL_MS  # the shortest allowed
SYSTEM = " ".join(f"Clause {i}: refunds need the booking code." for i in range(150))


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_cl100k()


@dataclass
class Pair:
    one: PrefixCacheCore
    other: PrefixCacheCore
    clock: ManualClock
    ledger: CommitLedger


def _core(
    tokenizer: Tokenizer,
    cache: WarmStore,
    ledger: CommitLedger,
    clock: ManualClock,
    table: ModelTable = TABLE,
) -> PrefixCacheCore:
    return PrefixCacheCore(
        table=table,
        tokenizer=TokenizerSlot(tokenizer),
        cache=cache,
        views=ReplicaViews(65536),
        ledger=ledger,
        clock=clock,
        lookback=20,
    )


@pytest.fixture
async def pair(
    tokenizer: Tokenizer,
    warm_store: WarmStore,
    make_ledger: LedgerFactory,
    redis_client: Redis | None,
    request: pytest.FixtureRequest,
) -> AsyncIterator[Pair]:
    """Two prefix-cache cores (replicas) on one shared state and one virtual clock."""
    clock, ledger = ManualClock(), make_ledger(TTL_MS)
    if redis_client is None:  # in memory, "shared" is the same objects
        one, other = (_core(tokenizer, warm_store, ledger, clock) for _ in range(2))
        yield Pair(one, other, clock, ledger)
        return
    second = client_of(request.getfixturevalue("redis_url"))  # its own connection
    try:
        other = _core(tokenizer, RedisWarmStore(second), RedisCommitLedger(second, TTL_MS), clock)
        yield Pair(_core(tokenizer, warm_store, ledger, clock), other, clock, ledger)
    finally:
        await second.aclose()


def ask(question: str) -> pb.CompleteRequest:
    return pb.CompleteRequest(
        model="sim-large",
        system=[pb.ContentBlock(text=SYSTEM, cache_control=pb.CacheControl())],
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=question)])],
        max_tokens=50,
    )


async def test_warm_on_one_replica_final_on_the_other_bills_once(pair: Pair) -> None:
    warm = await pair.one.warm("a", "r1", "sim-large", ask("Refund?"), "")
    final = await pair.other.final("a", "r1", "sim-large", 30, 0, "")
    assert final.split == warm
    # sim-large (priced like Claude Sonnet 4.5): input 3000, 5-minute write 3750, output 15000
    expected = warm.input_tokens * 3000 + warm.write_5m_tokens * 3750 + 30 * 15000
    assert final.charge.cost_nanos == expected
    assert await pair.one.final("a", "r1", "sim-large", 30, 0, "") == final  # a retry elsewhere
    totals = TenantTotals(
        requests=1,
        input_tokens=warm.input_tokens,
        cache_creation_input_tokens=warm.write_5m_tokens,
        output_tokens=30,
        cost_nanos=expected,
        baseline_nanos=final.charge.baseline_nanos,
    )
    assert await pair.one.totals("a") == totals == await pair.other.totals("a")
    assert await pair.other.totals("b") == TenantTotals()


async def test_a_repeated_warm_on_the_other_replica_returns_the_recorded_split(
    pair: Pair,
) -> None:
    first = await pair.one.warm("a", "r1", "sim-large", ask("Refund?"), "")
    again = await pair.other.warm("a", "r1", "sim-large", ask("Refund?"), "")
    assert again == first and first.write_5m_tokens > 0  # not turned into a read


async def test_racing_finals_on_one_request_id_add_to_the_totals_exactly_once(
    pair: Pair,
) -> None:
    """Idempotency by request id: every replica's FINAL returns the one bill that stands."""
    for i in range(5):
        await pair.one.warm("a", f"r{i}", "sim-large", ask(f"Refund {i}?"), "")
        cores = (pair.one, pair.other, pair.one, pair.other)
        finals = await asyncio.gather(
            *(core.final("a", f"r{i}", "sim-large", 10 + k, 0, "") for k, core in enumerate(cores))
        )
        assert all(f == finals[0] for f in finals)
    totals = await pair.other.totals("a")
    assert totals.requests == 5
    assert totals == await pair.one.totals("a")


async def test_of_racing_finals_on_one_request_id_only_the_first_is_not_repeated(
    pair: Pair,
) -> None:
    """A replica's FINAL says whether the bill was recorded before it (``repeated``), decided
    in the step that records it: of FINALs racing on one key, one is the first (a caller
    counts the bill on that reply alone), however the replicas interleave."""
    for i in range(5):
        await pair.one.warm("a", f"r{i}", "sim-large", ask(f"Refund {i}?"), "")
        cores = (pair.one, pair.other, pair.one, pair.other)
        stood = await asyncio.gather(
            *(
                core.final_commit("a", f"r{i}", "sim-large", 10 + k, 0, "")
                for k, core in enumerate(cores)
            )
        )
        assert [s.repeated for s in stood].count(False) == 1, stood
        assert all(s.final == stood[0].final for s in stood)
    late = await pair.other.final_commit("a", "r0", "sim-large", 10, 0, "")
    assert late.repeated


async def test_racing_warms_on_one_request_id_record_one_split(pair: Pair) -> None:
    splits = await asyncio.gather(
        pair.one.warm("a", "r1", "sim-large", ask("Refund?"), ""),
        pair.other.warm("a", "r1", "sim-large", ask("Refund?"), ""),
    )
    record = await pair.ledger.get("a", "r1", pair.clock.now_ms())
    assert record is not None and splits[0] == splits[1] == record.split


async def test_records_expire_on_the_injected_clock_not_on_redis_key_expiry(
    pair: Pair, redis_client: Redis | None
) -> None:
    await pair.one.warm("a", "r1", "sim-large", ask("Refund?"), "")
    pair.clock.advance(ms=TTL_MS - 1)
    assert await pair.ledger.get("a", "r1", pair.clock.now_ms()) is not None
    pair.clock.advance(ms=1)  # the record's expires_at_ms
    with pytest.raises(NoWarmCommit):
        await pair.other.final("a", "r1", "sim-large", 1, 0, "")
    if redis_client is not None:  # the key is still there: key expiry only collects garbage
        assert isinstance(pair.ledger, RedisCommitLedger)
        assert await redis_client.exists(pair.ledger.record_key("a", "r1")) == 1
    assert await pair.one.totals("a") == TenantTotals()
    again = await pair.other.warm("a", "r1", "sim-large", ask("Refund?"), "")  # a new record
    assert again.write_5m_tokens > 0 and again.read_tokens == 0  # the 5-minute prefix expired
    assert (await pair.one.final("a", "r1", "sim-large", 1, 0, "")).split == again
    assert (await pair.other.totals("a")).requests == 1


async def test_a_final_refreshes_the_record_so_a_late_retry_still_gets_its_bill(
    pair: Pair,
) -> None:
    await pair.one.warm("a", "r1", "sim-large", ask("Refund?"), "")
    pair.clock.advance(ms=TTL_MS - 1)
    final = await pair.other.final("a", "r1", "sim-large", 5, 0, "")
    pair.clock.advance(ms=TTL_MS - 1)  # 2 TTLs after WARM, 1 TTL - 1 ms after FINAL
    assert await pair.one.final("a", "r1", "sim-large", 5, 0, "") == final
    assert (await pair.one.totals("a")).requests == 1


@pytest.mark.parametrize("ttl_ms", [0, MIN_RECORD_TTL_MS - 1])
def test_a_record_ttl_under_an_hour_is_refused(make_ledger: LedgerFactory, ttl_ms: int) -> None:
    """A TTL of 0 expired every WARM record as it was written: every FINAL then failed with
    "no WARM commit", the router's replays too, and nothing was ever billed."""
    with pytest.raises(ValueError, match=f">= {MIN_RECORD_TTL_MS} ms"):
        make_ledger(ttl_ms)


async def test_the_totals_of_many_tenants_are_read_at_once_as_each_alone(pair: Pair) -> None:
    """GetStats of every tenant asked for one tenant's totals at a time: 10,000 calls, which
    ran out its deadline past ~6,000 tenants. TotalsBatch reads a page of tenants in one go
    (one Redis pipeline), each as Totals reads it, repeats once, in the order asked."""
    await pair.one.warm("a", "r1", "sim-large", ask("Refund?"), "")
    await pair.other.final("a", "r1", "sim-large", 30, 0, "")
    many = [f"t{i}" for i in range(997)]  # with a, b and a repeat: the most a call takes
    got = await pair.other.totals_of(["a", "b", "a", *many])
    assert [tenant for tenant, _ in got] == ["a", "b", *many]
    assert got[0][1] == await pair.one.totals("a") and got[0][1].requests == 1
    assert all(totals == TenantTotals() for _, totals in got[1:])


def _sent(client: Redis, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The commands ``client`` sends from now on (each a round trip), by name, as sent."""
    sent: list[str] = []
    execute = cast(Callable[..., Awaitable[Any]], client.execute_command)  # untyped in redis-py

    async def counted(*args: Any, **options: Any) -> Any:
        sent.append(str(args[0]).upper())
        return await execute(*args, **options)

    monkeypatch.setattr(client, "execute_command", counted)
    return sent


async def test_a_final_on_the_replica_of_its_warm_is_one_redis_round_trip(
    pair: Pair, redis_client: Redis | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The FINAL read its WARM record (HMGET) before its script: two round trips (~0.4-0.5 ms
    of a miss). The replica keeps the WARM it wrote: one script, which checks it stands."""
    if redis_client is None:
        pytest.skip("round trips to Redis")
    await pair.one.warm("a", "r0", "sim-large", ask("Refund?"), "")  # the scripts loaded
    await pair.one.final("a", "r0", "sim-large", 30, 0, "")
    warm = await pair.one.warm("a", "r1", "sim-large", ask("Refund?"), "")
    sent = _sent(redis_client, monkeypatch)
    final = await pair.one.final("a", "r1", "sim-large", 30, 0, "")
    assert sent == ["EVALSHA"]
    assert final.split == warm
    sent.clear()  # a repeat reads (the copy went with the FINAL)
    assert await pair.one.final("a", "r1", "sim-large", 30, 0, "") == final
    assert sent == ["HMGET"]
    assert (await pair.other.totals("a")).requests == 2  # r0 and r1, once each


async def test_a_final_is_priced_from_the_warm_that_stands_not_an_older_copy(
    pair: Pair,
) -> None:
    """The replica's copy of a WARM record can be stale: the record expired and another
    replica recorded a new WARM (here of another model) for the request id. The FINAL is
    priced from the record that stands, as when it read the record first."""
    await pair.one.warm("a", "r1", "sim-large", ask("Refund?"), "")
    pair.clock.advance(ms=TTL_MS)  # the record expires
    again = await pair.other.warm("a", "r1", "sim-small", ask("Refund?"), "")
    final = await pair.one.final("a", "r1", "", 30, 0, "")
    assert final.split == again
    expected = await pair.other.final("a", "r1", "sim-small", 30, 0, "")  # the repeat
    assert final == expected
    small = TABLE.get("sim-small")
    assert small is not None
    rates = small.rates(again.prompt_tokens)
    assert final.charge.cost_nanos == (
        again.input_tokens * rates.input_nanos
        + again.write_5m_tokens * rates.cache_write_5m_nanos
        + 30 * rates.output_nanos
    )
    with pytest.raises(BadRequest, match="differs from 'sim-small'"):
        await pair.one.final("a", "r1", "sim-large", 30, 0, "")
    assert (await pair.one.totals("a")).requests == 1


async def test_a_repeated_final_refused_on_its_own_terms_gets_the_standing_bill(
    pair: Pair,
) -> None:
    """A repeated FINAL returns the bill that stands without pricing its own (as before):
    one whose usage disagrees with its output count is not refused when a FINAL stands,
    even on the replica that holds the WARM's copy; without one standing it is refused."""
    await pair.one.warm("a", "r1", "sim-large", ask("Refund?"), "")
    usage = pc.ProviderUsage(anthropic=pc.AnthropicUsage(input_tokens=10, output_tokens=7))
    with pytest.raises(BadRequest, match="differs from the provider's reported"):
        await pair.one.final("a", "r1", "sim-large", 30, 0, "", usage)
    await pair.one.warm("a", "r1", "sim-large", ask("Refund?"), "")  # the copy again (the
    # refused FINAL dropped it), for the repeat below to meet
    first = await pair.other.final("a", "r1", "sim-large", 30, 0, "")
    assert await pair.one.final("a", "r1", "sim-large", 30, 0, "", usage) == first
    assert (await pair.one.totals("a")).requests == 1


async def test_the_warms_kept_for_their_final_are_bounded_and_an_evicted_one_is_read(
    tokenizer: Tokenizer, redis_client: Redis | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the bound the oldest WARM's copy goes: its FINAL reads the record first, and is
    billed the same."""
    if redis_client is None:
        pytest.skip("round trips to Redis")
    clock = ManualClock()
    ledger = RedisCommitLedger(redis_client, TTL_MS, final_hints=1)
    core = _core(tokenizer, RedisWarmStore(redis_client), ledger, clock)
    await core.warm("a", "r0", "sim-large", ask("Refund?"), "")  # the scripts loaded
    await core.final("a", "r0", "sim-large", 30, 0, "")
    first = await core.warm("a", "r1", "sim-large", ask("Refund 1?"), "")
    await core.warm("a", "r2", "sim-large", ask("Refund 2?"), "")
    sent = _sent(redis_client, monkeypatch)
    assert (await core.final("a", "r1", "sim-large", 30, 0, "")).split == first
    assert sent == ["HMGET", "EVALSHA"]
    sent.clear()
    await core.final("a", "r2", "sim-large", 30, 0, "")
    assert sent == ["EVALSHA"]
    assert (await core.totals("a")).requests == 3
    with pytest.raises(ValueError, match="final_hints must be >= 0"):
        RedisCommitLedger(redis_client, TTL_MS, final_hints=-1)


async def test_a_refused_final_leaves_no_copy_of_its_warm(
    pair: Pair, redis_client: Redis | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refused FINAL (another model than its WARM's) drops the replica's copy of the WARM
    as a billed one does: before, the copy stayed until the bound pushed it out, and the
    FINAL sent again with the right model was priced from it (one round trip)."""
    if redis_client is None:
        pytest.skip("round trips to Redis")
    await pair.one.warm("a", "r0", "sim-large", ask("Refund?"), "")  # the scripts loaded
    await pair.one.final("a", "r0", "sim-large", 30, 0, "")
    warm = await pair.one.warm("a", "r1", "sim-large", ask("Refund?"), "")
    with pytest.raises(BadRequest, match="differs from 'sim-large'"):
        await pair.one.final("a", "r1", "sim-small", 30, 0, "")
    sent = _sent(redis_client, monkeypatch)
    assert (await pair.one.final("a", "r1", "sim-large", 30, 0, "")).split == warm
    assert sent == ["HMGET", "EVALSHA"]  # no copy: the record read first
    assert (await pair.other.totals("a")).requests == 2


async def test_a_bill_failing_otherwise_than_refusing_on_the_copy_is_raised_at_once(
    redis_client: Redis | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pricing from the copy catches only a refusal (``ValueError``: BadRequest, BadUsage),
    priced again from the record that stands; any other exception is a fault, raised at once
    without a round trip (before, swallowed and the record read and priced again)."""
    if redis_client is None:
        pytest.skip("the copy is the Redis ledger's")
    ledger = RedisCommitLedger(redis_client, TTL_MS)
    await ledger.put_warm("a", "r1", "sim-large", "", Split(10, 0, 0, 0), 0)
    calls: list[CommitRecord] = []

    def bill(record: CommitRecord) -> Final | Stood:
        calls.append(record)
        raise KeyError("a fault in pricing")

    sent = _sent(redis_client, monkeypatch)
    with pytest.raises(KeyError, match="a fault in pricing"):
        await ledger.put_final("a", "r1", 1, bill)
    assert (sent, len(calls)) == ([], 1)


async def test_a_final_whose_warm_names_a_model_this_replicas_table_lacks_is_failed_precondition(
    pair: Pair, tokenizer: Tokenizer, warm_store: WarmStore
) -> None:
    """Two replicas of different model tables on one ledger (a rolling deploy): a WARM taken
    by the replica whose table has the model, its FINAL sent to the one whose table lacks it,
    is refused ``WarmModelUnknown`` (FAILED_PRECONDITION) naming the model, and bills nothing;
    the FINAL on a replica with the model bills it once, and a FINAL sent again to the other
    then gets that bill back. Before, an AssertionError (UNKNOWN to the router)."""
    lacking = ModelTable(
        models={k: v for k, v in TABLE.models.items() if k != "claude-sonnet-4"}, auto=TABLE.auto
    )
    other = _core(tokenizer, warm_store, pair.ledger, pair.clock, lacking)
    request = ask("Refund?")
    request.model = "claude-sonnet-4"
    warm = await pair.one.warm("a", "r1", "claude-sonnet-4", request, "")
    for model in ("claude-sonnet-4", ""):  # named by the FINAL, or left to the WARM's
        with pytest.raises(WarmModelUnknown, match="model 'claude-sonnet-4', which this") as e:
            await other.final("a", "r1", model, 30, 0, "")
        assert not isinstance(e.value, BadRequest)  # not the request's fault
    assert await pair.one.totals("a") == TenantTotals()  # nothing billed, nothing written
    billed = await pair.one.final_commit("a", "r1", "claude-sonnet-4", 30, 0, "")
    assert (billed.final.split, billed.repeated) == (warm, False)
    again = await other.final_commit("a", "r1", "", 30, 0, "")
    assert (again.final, again.repeated) == (billed.final, True)
    assert (await pair.one.totals("a")).requests == 1
