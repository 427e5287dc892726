"""The provider looks its cache up when the request arrives (its Plan), not at its first token
(its WARM): a prefix live on arrival is a read even if its entry runs out before the first token,
on both backends; and a WARM the router's billing outbox replays later (``planned_at_ms``) is
settled with its arrival's figures. Time is the injected ManualClock."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from redis.asyncio import Redis

from cachemesh.v1 import gateway_pb2 as pb
from services.common.clock import ManualClock
from services.common.models import load_model_table
from services.common.tokens import Tokenizer, load_cl100k
from services.prefix_cache.core import BadRequest, PrefixCacheCore, Prompt, TokenizerSlot
from services.prefix_cache.ledger import CommitLedger
from services.prefix_cache.plan_memo import PlanMemo
from services.prefix_cache.redis_store import RedisWarmStore
from services.prefix_cache.replica_view import ReplicaViews
from services.prefix_cache.rules import Probe, Split, Write
from services.prefix_cache.warm import READ_GRACE_MS, InMemoryWarmStore, WarmStore
from tests.redis_server import client_of
from tests.unit.conftest import LedgerFactory

SYSTEM = " ".join(f"Rule {i}: answer briefly and cite the policy section." for i in range(120))


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_cl100k()


@dataclass
class Rig:
    core: PrefixCacheCore
    clock: ManualClock


@pytest.fixture
def rig(tokenizer: Tokenizer, warm_store: WarmStore, make_ledger: LedgerFactory) -> Rig:
    clock = ManualClock()
    plans: PlanMemo[Prompt] = PlanMemo(clock, ttl_ms=600_000, max_blocks=1_000_000)
    core = PrefixCacheCore(
        table=load_model_table(),
        tokenizer=TokenizerSlot(tokenizer),
        cache=warm_store,
        views=ReplicaViews(65536),
        ledger=make_ledger(86_400_000),
        clock=clock,
        lookback=20,
        plans=plans,
    )
    return Rig(core, clock)


def ask(question: str, system: str = SYSTEM) -> pb.CompleteRequest:
    return pb.CompleteRequest(
        model="sim-large",
        system=[pb.ContentBlock(text=system, cache_control=pb.CacheControl())],
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=question)])],
        max_tokens=50,
    )


async def _turn_warmed_then_arriving(rig: Rig) -> tuple[int, str]:
    """A 5-minute prefix written, then a turn arriving 1 s before it runs out: its Plan
    predicts the read. Returns the prefix's tokens and the Plan's id."""
    cached = (await rig.core.warm("t", "r1", "sim-large", ask("Rule 1?"), "")).write_5m_tokens
    assert cached > 0
    rig.clock.advance(ms=299_000)
    arrival = await rig.core.plan("t", "sim-large", ask("Rule 2?"), [])
    assert arrival.split.read_tokens == cached and arrival.plan_id
    return cached, arrival.plan_id


async def test_a_prefix_live_on_arrival_is_read_though_it_expires_before_the_first_token(
    rig: Rig,
) -> None:
    """It was billed as a 1.25x write instead of a 0.1x read: the WARM judged it at now."""
    cached, plan_id = await _turn_warmed_then_arriving(rig)
    rig.clock.advance(ms=2_000)  # the first token, 1 s after the entry's expiry
    got = await rig.core.warm(
        "t", "r2", "sim-large", None, "", max_read_tokens=cached, plan_id=plan_id
    )
    assert got.read_tokens == cached and got.creation_tokens == 0
    # the read refreshed the entry from its request's start (the arrival at 299 s), not from
    # its first token (301 s): live until 599 s
    rig.clock.advance(ms=297_999)
    again = await rig.core.plan("t", "sim-large", ask("Rule 3?"), [])
    assert again.split.read_tokens == cached
    rig.clock.advance(ms=1)
    gone = await rig.core.plan("t", "sim-large", ask("Rule 4?"), [])
    assert gone.split.read_tokens == 0 and gone.split.write_5m_tokens == cached


async def test_another_commit_meanwhile_does_not_drop_the_entry_read_on_arrival(
    rig: Rig,
) -> None:
    """The in-memory store purged entries expired at now as any commit passed, so it (and not
    Redis) lost the prefix a request had found on arrival: both keep it ``READ_GRACE_MS``."""
    cached, plan_id = await _turn_warmed_then_arriving(rig)
    rig.clock.advance(ms=2_000)
    other = ask("Q?", system="Another tenant's long policy. " * 400)
    await rig.core.warm("u", "r9", "sim-large", other, "")  # purges what is expired by now
    got = await rig.core.warm(
        "t", "r2", "sim-large", None, "", max_read_tokens=cached, plan_id=plan_id
    )
    assert got.read_tokens == cached


async def test_a_prefix_read_on_arrival_and_lost_before_the_first_token_is_still_the_read(
    rig: Rig, redis_client: Redis | None
) -> None:
    """Redis restarted empty (or flushed) between a turn's Plan and its first token: the WARM
    naming the Plan held here judged the prefix again, found nothing and billed the 1,440
    tokens the provider read on arrival as a 5-minute write (5,418,000 nanos instead of
    450,000), where another replica (the router resends the WARM with the arrival) billed the
    read. The Plan's read stands, and the settle writes the prefix back from the arrival."""
    if redis_client is None:
        pytest.skip("the in-memory store loses its state only with its Plans (a restart)")
    cached, plan_id = await _turn_warmed_then_arriving(rig)
    await redis_client.flushdb()  # the restart: every warm prefix (and record) gone
    rig.clock.advance(ms=500)  # the first token
    got = await rig.core.warm(
        "t", "r2", "sim-large", None, "", max_read_tokens=cached, plan_id=plan_id
    )
    assert got.read_tokens == cached and got.creation_tokens == 0
    later = await rig.core.plan("t", "sim-large", ask("Rule 3?"), [])
    assert later.split.read_tokens == cached  # written back, as the provider's cache holds it


async def test_without_the_plan_s_read_an_arrival_is_judged_at_most_the_read_grace_before(
    rig: Rig,
) -> None:
    """A WARM naming its Plan but not the Plan's read (``max_read_tokens``): the lookback is
    bounded by what the stores keep after expiry (identical on both)."""
    cached, plan_id = await _turn_warmed_then_arriving(rig)
    rig.clock.advance(ms=1_000 + READ_GRACE_MS)  # expired READ_GRACE_MS ago at the first token
    got = await rig.core.warm("t", "r2", "sim-large", None, "", plan_id=plan_id)
    assert got.read_tokens == 0 and got.write_5m_tokens == cached


async def test_a_first_token_past_the_read_grace_is_billed_alike_on_every_prefix_cache(
    rig: Rig, warm_store: WarmStore, make_ledger: LedgerFactory
) -> None:
    """A prefix written at 0 s, a turn arriving at 290 s whose Plan (and the provider) reads
    it, its first token at 380 s: the prefix-cache holding the Plan judged the read no earlier
    than ``READ_GRACE_MS`` before the first token, found the entry expired and billed a
    1,440-token 5-minute write (5,415,000 nanos), where another prefix-cache replica (the
    router resends the WARM with the arrival) billed the read (447,000): the bill depended on
    load balancing. Both settle it as of the arrival: the Plan's read, refreshed from then."""
    other = _core_of(rig.clock, warm_store, make_ledger(86_400_000))  # holds no Plan
    for tenant in ("held", "elsewhere"):
        wrote = await rig.core.warm(tenant, "w", "sim-large", ask("Rule 1?"), "")
        assert wrote.write_5m_tokens > 0
    rig.clock.advance(s=290)
    held = await rig.core.plan("held", "sim-large", ask("Rule 2?"), [])
    elsewhere = await rig.core.plan("elsewhere", "sim-large", ask("Rule 2?"), [])
    rig.clock.advance(s=90)
    got = {
        "held": await rig.core.warm(
            "held",
            "f",
            "sim-large",
            None,
            "",
            max_read_tokens=held.split.read_tokens,
            plan_id=held.plan_id,
        ),
        # what the router sends after the other replica's FAILED_PRECONDITION (PlanGone)
        "elsewhere": await other.warm(
            "elsewhere",
            "f",
            "sim-large",
            ask("Rule 2?"),
            "",
            max_read_tokens=elsewhere.split.read_tokens,
            plan_id=elsewhere.plan_id,
            planned_at_ms=elsewhere.prompt.planned_at_ms,
        ),
    }
    cached = held.split.read_tokens
    assert cached == 1_440 and elsewhere.split.read_tokens == cached
    assert got["held"] == got["elsewhere"] == held.split
    assert got["held"].read_tokens == cached and got["held"].creation_tokens == 0
    # the read refreshed the entry from the arrival (290 s): live until 590 s on both
    arrived = held.prompt.planned_at_ms
    assert arrived is not None
    rig.clock.advance(ms=arrived + 299_999 - rig.clock.now_ms())
    for tenant in ("held", "elsewhere"):
        live = await rig.core.plan(tenant, "sim-large", ask("Rule 3?"), [])
        assert live.split.read_tokens == cached, tenant
    rig.clock.advance(ms=1)
    for tenant in ("held", "elsewhere"):
        gone = await rig.core.plan(tenant, "sim-large", ask("Rule 4?"), [])
        assert gone.split.read_tokens == 0, tenant


async def test_without_its_plan_a_warm_judges_at_its_own_time(rig: Rig) -> None:
    """A WARM whose Plan this process does not hold (another prefix-cache made it, or no Plan)
    cannot know the arrival: the probes are judged at the first token, as before."""
    cached, _ = await _turn_warmed_then_arriving(rig)
    rig.clock.advance(ms=2_000)
    got = await rig.core.warm("t", "r2", "sim-large", ask("Rule 2?"), "", max_read_tokens=cached)
    assert got.read_tokens == 0 and got.write_5m_tokens == cached


async def test_an_entry_lives_its_ttl_from_the_start_of_the_request_that_wrote_it(
    rig: Rig,
) -> None:
    """Anthropic: the lifetime is measured from the start of the request that writes or reads
    the entry, not from its response. It was counted from the first token: a turn arriving
    5 minutes after the writer started, but within 5 minutes of its first token, was billed a
    0.1x read where the provider bills a 1.25x write."""
    first = await rig.core.plan("t", "sim-large", ask("Rule 1?"), [])
    rig.clock.advance(s=30)  # the first token, 30 s after the request started
    wrote = await rig.core.warm(
        "t", "r1", "sim-large", None, "", max_read_tokens=0, plan_id=first.plan_id
    )
    cached = wrote.write_5m_tokens
    assert cached > 0
    # readable from the first token on, until 5 minutes after the writer's start
    rig.clock.advance(ms=269_999)
    live = await rig.core.plan("t", "sim-large", ask("Rule 2?"), [])
    assert live.split.read_tokens == cached
    rig.clock.advance(ms=1)  # 300 s after the writer started, 270 s after its first token
    late = await rig.core.plan("t", "sim-large", ask("Rule 3?"), [])
    assert late.split.read_tokens == 0
    rig.clock.advance(s=30)
    got = await rig.core.warm(
        "t", "r2", "sim-large", None, "", max_read_tokens=0, plan_id=late.plan_id
    )
    assert got.read_tokens == 0 and got.write_5m_tokens == cached


async def test_a_refresh_from_an_earlier_start_never_shortens_an_entry(
    warm_store: WarmStore,
) -> None:
    """Two reads of one entry: the one that started later but reached its first token first
    set the later expiry; the other's refresh (from its earlier start) keeps it."""
    scope = ("t", "sim-large")
    await warm_store.settle(scope, [], [Write("d", 2_000, 300_000)], 0, started_ms=0)
    probe = [Probe("d", 2_000)]
    hit = await warm_store.settle(scope, probe, [], 20_000, 10_000, started_ms=10_000)
    assert hit is not None and hit.expires_at_ms == 300_000
    await warm_store.settle(scope, probe, [], 30_000, 0, started_ms=0)
    assert await warm_store.longest(scope, probe, 309_999) is not None
    assert await warm_store.longest(scope, probe, 310_000) is None


def _core_of(clock: ManualClock, store: WarmStore, ledger: CommitLedger) -> PrefixCacheCore:
    return PrefixCacheCore(
        table=load_model_table(),
        tokenizer=TokenizerSlot(load_cl100k()),
        cache=store,
        views=ReplicaViews(65536),
        ledger=ledger,
        clock=clock,
        lookback=20,
    )


async def _read_on_arrival(core: PrefixCacheCore, clock: ManualClock) -> tuple[int, int]:
    """A 5-minute prefix written at 0 s, a turn arriving at 60 s whose Plan predicts reading
    it (the provider refreshes it then: live until 360 s). Returns its tokens and the
    arrival (``PlanResponse.planned_at_ms``), the figures a billing-outbox replay carries."""
    cached = (await core.warm("t", "r1", "sim-large", ask("Rule 1?"), "")).write_5m_tokens
    assert cached > 0
    clock.advance(s=60)
    arrival = await core.plan("t", "sim-large", ask("Rule 2?"), [])
    assert arrival.split.read_tokens == cached and arrival.split.creation_tokens == 0
    assert arrival.prompt.planned_at_ms == clock.now_ms()
    return cached, clock.now_ms()


async def _replay(core: PrefixCacheCore, cached: int, arrived: int) -> Split:
    """The router's billing outbox replaying the turn's WARM: the request, no plan_id."""
    return await core.warm(
        "t", "r2", "sim-large", ask("Rule 2?"), "", max_read_tokens=cached, planned_at_ms=arrived
    )


async def _read_at(core: PrefixCacheCore, at_ms: int, clock: ManualClock) -> int:
    clock.advance(ms=at_ms - clock.now_ms())
    return (await core.plan("t", "sim-large", ask("Rule 3?"), [])).split.read_tokens


async def test_a_replay_after_the_prefix_ran_out_bills_the_read_of_its_arrival(rig: Rig) -> None:
    """The outbox replayed 6 minutes after the arrival: the WARM judged the prefix then, found
    it expired and billed the read as a 5-minute write (9x). It is the read it was, and the
    replay warms nothing: the provider's entry ran out at 360 s."""
    cached, arrived = await _read_on_arrival(rig.core, rig.clock)
    rig.clock.advance(s=360)
    got = await _replay(rig.core, cached, arrived)
    assert got.read_tokens == cached and got.creation_tokens == 0
    assert await _read_at(rig.core, rig.clock.now_ms(), rig.clock) == 0


async def test_a_replay_to_a_restarted_prefix_cache_bills_the_read_of_its_arrival(
    rig: Rig, make_ledger: LedgerFactory
) -> None:
    """The Plan ran on a prefix-cache whose warm state (in memory) was lost in a restart before
    the replay: the replay found nothing warm and billed a write. The Plan's read is the record;
    the entry it read lives from the arrival (its 5 minutes), as the provider's does."""
    before = _core_of(rig.clock, InMemoryWarmStore(), make_ledger(86_400_000))
    cached, arrived = await _read_on_arrival(before, rig.clock)
    rig.clock.advance(s=10)
    got = await _replay(rig.core, cached, arrived)  # rig.core: the restarted one, state empty
    assert got.read_tokens == cached and got.creation_tokens == 0
    assert await _read_at(rig.core, arrived + 299_999, rig.clock) == cached
    assert await _read_at(rig.core, arrived + 300_000, rig.clock) == 0


async def test_a_replay_refreshes_the_prefix_from_its_arrival_not_from_the_replay(
    rig: Rig,
) -> None:
    """A replay 2 minutes after the arrival refreshed the prefix to 5 minutes from the replay
    (live until 480 s), where the provider's read refreshed it from the arrival (360 s)."""
    cached, arrived = await _read_on_arrival(rig.core, rig.clock)
    rig.clock.advance(s=120)
    assert (await _replay(rig.core, cached, arrived)).read_tokens == cached
    assert await _read_at(rig.core, arrived + 299_999, rig.clock) == cached
    assert await _read_at(rig.core, arrived + 300_000, rig.clock) == 0


async def test_a_replay_is_bounded_by_the_plan_s_read(rig: Rig) -> None:
    """A prefix warm at the replay but cold on arrival (max_read_tokens=0) is not read."""
    cached, arrived = await _read_on_arrival(rig.core, rig.clock)
    got = await rig.core.warm(
        "t", "r2", "sim-large", ask("Rule 2?"), "", max_read_tokens=0, planned_at_ms=arrived
    )
    assert got.read_tokens == 0 and got.write_5m_tokens == cached


async def test_without_a_plan_requests_arriving_together_do_not_read_each_other_s_writes(
    rig: Rig,
) -> None:
    """The router's Plan failed (prefix-cache slow in a burst), so C's and D's WARMs carried
    the request and no Plan: D, judged at its first token 100 ms after C's, read C's fresh
    1,440-token write (0.1x), where the provider, looked up when both arrived before any
    cache existed, bills D the write too (1.25x). With the router's arrival time both write."""
    arrived = rig.clock.now_ms()
    rig.clock.advance(s=2)  # the Plan's timeout, then the model's first token
    c = await rig.core.warm("t", "C", "sim-large", ask("C?"), "", arrived_at_ms=arrived)
    rig.clock.advance(ms=100)
    d = await rig.core.warm("t", "D", "sim-large", ask("D?"), "", arrived_at_ms=arrived)
    assert c.write_5m_tokens > 1_000 and c.read_tokens == 0
    assert (d.read_tokens, d.write_5m_tokens) == (0, c.write_5m_tokens)
    # a request arriving once C's write exists reads it, without a Plan as with one
    later = rig.clock.now_ms()
    rig.clock.advance(s=2)
    e = await rig.core.warm("t", "E", "sim-large", ask("E?"), "", arrived_at_ms=later)
    assert (e.read_tokens, e.creation_tokens) == (c.write_5m_tokens, 0)
    # its lifetime runs from its arrival: the 5 minutes of E's refresh end at later + 300 s
    assert await _read_at(rig.core, later + 299_999, rig.clock) == c.write_5m_tokens
    assert await _read_at(rig.core, later + 300_000, rig.clock) == 0


async def test_an_entry_is_readable_only_by_requests_arriving_after_it_was_written(
    warm_store: WarmStore,
) -> None:
    """An entry exists from its writer's first token: one expired and written again after a
    request's arrival is no read for it, though its new expiry is past that arrival."""
    scope, probe = ("t", "sim-large"), [Probe("d", 2_000)]
    await warm_store.settle(scope, [], [Write("d", 2_000, 300_000)], 10_000, started_ms=0)
    assert await warm_store.settle(scope, probe, [], 11_000, 9_999, started_ms=9_999) is None
    hit = await warm_store.settle(scope, probe, [], 11_000, 10_000, started_ms=10_000)
    assert hit is not None and hit.tokens == 2_000
    # a refresh keeps the entry's first-readable time; a write after it expired sets a new one
    await warm_store.settle(scope, [], [Write("d", 2_000, 300_000)], 400_000, started_ms=390_000)
    assert await warm_store.settle(scope, probe, [], 401_000, 395_000, 395_000) is None
    assert await warm_store.settle(scope, probe, [], 401_000, 400_000, 400_000) is not None


async def test_an_entry_of_an_older_version_is_readable_since_always(redis_url: str) -> None:
    """Entries an older prefix-cache wrote into a shared Redis have no first-readable time."""
    client = client_of(redis_url)
    try:
        await client.flushdb()
        store = RedisWarmStore(client)
        scope, probe = ("t", "sim-large"), [Probe("d", 2_000)]
        key = store.key(scope, "d")
        # as an older version wrote it: no created_at_ms
        await client.hset(key, "tokens", 2_000)
        await client.hset(key, "ttl_ms", 300_000)
        await client.hset(key, "expires_at_ms", 300_000)
        hit = await store.settle(scope, probe, [], 100_000, 0, started_ms=0)
        assert hit is not None and hit.tokens == 2_000
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("max_read", "planned_at", "arrived_at", "message"),
    [
        (0, -1, None, "planned_at_ms must be >= 0"),
        (None, 0, None, "planned_at_ms needs max_read_tokens"),  # as ever: without a Plan,
        (None, None, -1, "arrived_at_ms must be >= 0"),  # the arrival is arrived_at_ms
    ],
)
async def test_a_replay_s_arrival_is_checked(
    rig: Rig, max_read: int | None, planned_at: int | None, arrived_at: int | None, message: str
) -> None:
    with pytest.raises(BadRequest, match=message):
        await rig.core.warm(
            "t",
            "r2",
            "sim-large",
            ask("Q?"),
            "",
            max_read_tokens=max_read,
            planned_at_ms=planned_at,
            arrived_at_ms=arrived_at,
        )
    assert await rig.core.warm_prefixes() == 0  # refused before any change


async def test_a_refused_warm_leaves_its_plan_for_the_warm_sent_right(rig: Rig) -> None:
    """A WARM refused INVALID_ARGUMENT (kv_cached_tokens out of the prompt's range) took its
    Plan before the check ("bad input changes nothing" did not hold): the corrected WARM then
    failed PlanGone and had to carry the request again."""
    cached, plan_id = await _turn_warmed_then_arriving(rig)
    with pytest.raises(BadRequest, match="kv_cached_tokens"):
        await rig.core.warm(
            "t", "r2", "sim-large", None, "", 10**6, max_read_tokens=cached, plan_id=plan_id
        )
    got = await rig.core.warm(
        "t", "r2", "sim-large", None, "", max_read_tokens=cached, plan_id=plan_id
    )
    assert got.read_tokens == cached
