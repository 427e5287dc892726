"""The gRPC surface on loopback, behind the internal-credential interceptor."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import prefix_cache_pb2 as pc
from cachemesh.v1 import prefix_cache_pb2_grpc
from services.common.auth import InternalAuthInterceptor, internal_metadata
from services.common.clock import ManualClock
from services.common.env import ConfigError, Env, redacted_url
from services.common.models import ModelTable, load_model_table
from services.common.prompt import canonical_blocks
from services.common.tokens import Tokenizer, load_cl100k
from services.prefix_cache.api import PrefixCacheApi
from services.prefix_cache.app import serve
from services.prefix_cache.core import PrefixCacheCore, TokenizerSlot
from services.prefix_cache.replica_view import ReplicaViews
from services.prefix_cache.rules import Split
from services.prefix_cache.servicer import PrefixCacheServicer
from services.prefix_cache.settings import PrefixCacheSettings
from services.prefix_cache.warm import WarmStore
from services.router.grpc_adapters import failed
from tests.unit.conftest import LedgerFactory

TOKEN = "test-internal-token-0123456789"
AUTH = internal_metadata(TOKEN)
SYSTEM = " ".join(f"Policy {i}: refunds within thirty days need a receipt." for i in range(100))


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_cl100k()


@dataclass
class Served:
    stub: prefix_cache_pb2_grpc.PrefixCacheAsyncStub
    slot: TokenizerSlot


@pytest.fixture
async def served(
    tokenizer: Tokenizer, warm_store: WarmStore, make_ledger: LedgerFactory
) -> AsyncIterator[Served]:
    slot = TokenizerSlot(tokenizer)
    core = PrefixCacheCore(
        table=load_model_table(),
        tokenizer=slot,
        cache=warm_store,
        views=ReplicaViews(65536),
        ledger=make_ledger(86_400_000),
        clock=ManualClock(),
        lookback=20,
    )
    server = grpc.aio.server(interceptors=[InternalAuthInterceptor(TOKEN)])
    prefix_cache_pb2_grpc.add_PrefixCacheServicer_to_server(
        PrefixCacheServicer(PrefixCacheApi(core)), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield Served(prefix_cache_pb2_grpc.PrefixCacheStub(channel), slot)
    await server.stop(None)


def request() -> pb.CompleteRequest:
    return pb.CompleteRequest(
        model="sim-small",
        system=[pb.ContentBlock(text=SYSTEM, cache_control=pb.CacheControl())],
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="Refund?")])],
    )


def warm(request_id: str, tenant: str = "acme") -> pc.CommitRequest:
    return pc.CommitRequest(
        tenant=tenant,
        request_id=request_id,
        phase=pc.COMMIT_PHASE_WARM,
        model="sim-small",
        request=request(),
        replica="replica-1",
    )


def final(request_id: str, output_tokens: int = 30) -> pc.CommitRequest:
    return pc.CommitRequest(
        tenant="acme",
        request_id=request_id,
        phase=pc.COMMIT_PHASE_FINAL,
        output_tokens=output_tokens,
        kv_cached_tokens=0,
    )


async def test_calls_without_the_internal_credential_are_unauthenticated(served: Served) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await served.stub.Totals(pc.TotalsRequest(tenant="acme"))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_warm_final_totals_round_trip(served: Served, tokenizer: Tokenizer) -> None:
    blocks = canonical_blocks(request(), tokenizer)
    cached, total = blocks[0].tokens, sum(b.tokens for b in blocks)
    plan = await served.stub.Plan(
        pc.PlanRequest(tenant="acme", model="sim-small", request=request(), replicas=["x", "y"]),
        metadata=AUTH,
    )
    assert plan.prompt_tokens == total
    assert plan.usage == pb.Usage(
        input_tokens=total - cached,
        cache_creation_input_tokens=cached,
        cache_creation=pb.CacheCreation(ephemeral_5m_input_tokens=cached),  # a 5m breakpoint
    )
    assert [c.replica for c in plan.candidates] == ["x", "y"]

    first = await served.stub.Commit(warm("r1"), metadata=AUTH)
    assert first.usage.cache_creation_input_tokens == cached
    second = await served.stub.Commit(warm("r2"), metadata=AUTH)
    assert second.usage.cache_read_input_tokens == cached
    done = await served.stub.Commit(final("r2"), metadata=AUTH)
    cost = (total - cached) * 1000 + cached * 100 + 30 * 5000  # sim-small prices
    assert done.cost == pb.Cost(
        cost_nanos=cost,
        baseline_nanos=total * 1000 + 150_000,
        saved_nanos=total * 1000 + 150_000 - cost,
    )
    assert done.usage.output_tokens == 30 and done.usage.cache_read_input_tokens == cached
    assert not done.repeated
    again = await served.stub.Commit(final("r2", output_tokens=99), metadata=AUTH)
    assert again.repeated  # the recorded bill, which the first reply carried already
    again.repeated = False
    assert again == done

    totals = await served.stub.Totals(pc.TotalsRequest(tenant="acme"), metadata=AUTH)
    assert (totals.requests, totals.cost_nanos, totals.usage.output_tokens) == (1, cost, 30)
    batch = await served.stub.TotalsBatch(
        pc.TotalsBatchRequest(tenants=["globex", "acme"]), metadata=AUTH
    )
    assert [(row.tenant, row.totals) for row in batch.tenants] == [
        ("globex", pc.TotalsResponse(usage=pb.Usage(), drift=pc.UsageDrift())),
        ("acme", totals),
    ]
    ranked = await served.stub.Plan(
        pc.PlanRequest(
            tenant="acme", model="sim-small", request=request(), replicas=["x", "replica-1"]
        ),
        metadata=AUTH,
    )
    assert ranked.candidates[0] == pc.ReplicaCandidate(  # full blocks of 16, never the last token
        replica="replica-1", warm_prefix_tokens=(total - 1) // 16 * 16
    )


async def test_a_warm_with_only_the_router_s_arrival_is_accepted_and_judged_then(
    served: Served, tokenizer: Tokenizer
) -> None:
    """A new router's WARM without a Plan: the request and arrived_at_ms alone (no
    max_read_tokens, no planned_at_ms). Two arriving before either wrote both pay the write
    (the second read the first's fresh write when judged at its first token)."""
    cached = canonical_blocks(request(), tokenizer)[0].tokens
    arrived = ManualClock().now_ms() - 1  # the core's clock: both arrived before the writes
    for request_id in ("r1", "r2"):
        commit = warm(request_id)
        commit.arrived_at_ms = arrived
        got = await served.stub.Commit(commit, metadata=AUTH)
        assert got.usage.cache_creation_input_tokens == cached
        assert got.usage.cache_read_input_tokens == 0


def _with(commit: pc.CommitRequest, **fields: int) -> pc.CommitRequest:
    for name, value in fields.items():
        setattr(commit, name, value)
    return commit


@pytest.mark.parametrize(
    ("call", "code", "words"),
    [
        (
            pc.PlanRequest(tenant="acme", model="nope", request=request()),
            "FAILED_PRECONDITION",  # no bad request: the router sends its own table's models
            "model 'nope' is not in this prefix-cache replica's model table",
        ),
        (
            pc.PlanRequest(tenant="acme", model="auto", request=request()),
            "INVALID_ARGUMENT",
            "resolve 'auto'",
        ),
        (pc.PlanRequest(tenant="acme", model="", request=request()), "INVALID_ARGUMENT", "model"),
        (pc.PlanRequest(model="sim-small", request=request()), "INVALID_ARGUMENT", "tenant"),
        (pc.CommitRequest(tenant="acme", request_id="r"), "INVALID_ARGUMENT", "phase"),
        (final("never"), "FAILED_PRECONDITION", "WARM"),
        (warm(""), "INVALID_ARGUMENT", "request_id"),
        # an older router sends planned_at_ms with max_read_tokens only; a new one, without a
        # Plan, arrived_at_ms (an older prefix-cache refuses planned_at_ms alone)
        (_with(warm("p"), planned_at_ms=1), "INVALID_ARGUMENT", "planned_at_ms"),
        (_with(warm("a"), arrived_at_ms=-1), "INVALID_ARGUMENT", "arrived_at_ms"),
        (pc.TotalsRequest(), "INVALID_ARGUMENT", "tenant"),
        (pc.TotalsBatchRequest(), "INVALID_ARGUMENT", "tenants is required"),
        (pc.TotalsBatchRequest(tenants=["acme", "a b"]), "INVALID_ARGUMENT", "tenants[1]: tenant"),
        (pc.TotalsBatchRequest(tenants=["t"] * 1001), "INVALID_ARGUMENT", "at most 1,000"),
    ],
)
async def test_errors_map_to_status_codes_naming_the_field(
    served: Served, call: object, code: str, words: str
) -> None:
    method = {
        pc.PlanRequest: served.stub.Plan,
        pc.CommitRequest: served.stub.Commit,
        pc.TotalsRequest: served.stub.Totals,
        pc.TotalsBatchRequest: served.stub.TotalsBatch,
    }[type(call)]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await method(call, metadata=AUTH)  # type: ignore[operator]
    assert err.value.code() == getattr(grpc.StatusCode, code)
    assert words in (err.value.details() or "")
    # the router keeps a bill only on the table's mark: no other refusal carries it
    assert failed(err.value).table_lacks_model == ("model table" in words)


async def test_unavailable_until_the_tokenizer_is_loaded(served: Served) -> None:
    served.slot._tokenizer = None  # as before warm-up finished
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await served.stub.Commit(warm("r1"), metadata=AUTH)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_settings_defaults_and_fail_fast_naming_the_variable() -> None:
    settings = PrefixCacheSettings.from_env(Env({"CACHEMESH_INTERNAL_TOKEN": TOKEN}))
    assert settings.server.listen == "127.0.0.1:50053"
    assert (settings.lookback_blocks, settings.record_ttl_s) == (20, 86400)
    one = Env({"CACHEMESH_INTERNAL_TOKEN": TOKEN, "PREFIX_CACHE_LOOKBACK_BLOCKS": "1"})
    assert PrefixCacheSettings.from_env(one).lookback_blocks == 1
    # the breakpoint itself counts: 0 would check nothing, never a read
    for value in ("0", "-1"):
        with pytest.raises(ConfigError, match="PREFIX_CACHE_LOOKBACK_BLOCKS must be >= 1"):
            PrefixCacheSettings.from_env(
                Env({"CACHEMESH_INTERNAL_TOKEN": TOKEN, "PREFIX_CACHE_LOOKBACK_BLOCKS": value})
            )


@pytest.mark.parametrize("ttl_s", ["0", "3599"])
def test_a_record_ttl_under_an_hour_is_refused_naming_the_variable_and_the_floor(
    ttl_s: str,
) -> None:
    """0 was accepted and expired every WARM record as it was written: no answer was billed."""
    env = Env({"CACHEMESH_INTERNAL_TOKEN": TOKEN, "PREFIX_CACHE_RECORD_TTL_S": ttl_s})
    with pytest.raises(
        ConfigError, match=rf"PREFIX_CACHE_RECORD_TTL_S must be >= 3600.*got {ttl_s}"
    ):
        PrefixCacheSettings.from_env(env)
    hour = Env({"CACHEMESH_INTERNAL_TOKEN": TOKEN, "PREFIX_CACHE_RECORD_TTL_S": "3600"})
    assert PrefixCacheSettings.from_env(hour).record_ttl_s == 3600


async def test_serve_requires_the_internal_token() -> None:
    with pytest.raises(ConfigError, match="CACHEMESH_INTERNAL_TOKEN"):
        await serve({"OTEL_SDK_DISABLED": "true"})


async def test_serve_starts_and_stops() -> None:
    stop = asyncio.Event()
    stop.set()
    environ = {
        "CACHEMESH_INTERNAL_TOKEN": TOKEN,
        "PREFIX_CACHE_LISTEN": "127.0.0.1:0",
        "PREFIX_CACHE_METRICS_LISTEN": "127.0.0.1:0",
        "OTEL_SDK_DISABLED": "true",
    }
    await asyncio.wait_for(serve(environ, stop), timeout=30)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:1/0?password=S3cret&db=0", "redis://:***@127.0.0.1:1/0"),
        ("redis://:S3cret@127.0.0.1:1", "redis://:***@127.0.0.1:1/0"),
        ("rediss://user:S3cret@host:6380/2", "rediss://user:***@host:6380/2"),
        ("redis://user@host", "redis://user@host:6379/0"),
        ("unix:///run/redis.sock?password=S3cret", "unix://:***@/run/redis.sock"),
        ("redis://127.0.0.1:1/0?password=Ab@S3cret", "redis://:***@127.0.0.1:1/0"),
        ("redis://:12/S3cret@127.0.0.1:1/0", "redis://localhost:12/0"),  # as redis-py reads it
        ("redis://u:S3cret?b#c@host/0", "(a redis URL redis-py cannot read; not shown)"),
        ("redis://[::1]:6379/1", "redis://[::1]:6379/1"),
    ],
)
def test_a_url_is_shown_as_redis_reads_it_without_its_secrets(url: str, shown: str) -> None:
    """redis-py takes the password in the user part (any characters) or as ``?password=``;
    neither is shown, nor a parse error's message (it may quote the password)."""
    assert redacted_url(url) == shown


def test_a_url_redis_cannot_read_is_refused_without_its_value() -> None:
    environ = {
        "CACHEMESH_INTERNAL_TOKEN": TOKEN,
        "PREFIX_CACHE_REDIS_URL": "redis://u:S3cret?b@host/0",
        "OTEL_SDK_DISABLED": "true",
    }
    with pytest.raises(ConfigError, match="PREFIX_CACHE_REDIS_URL: not a Redis URL") as caught:
        asyncio.run(asyncio.wait_for(serve(environ, asyncio.Event()), timeout=30))
    assert "S3cret" not in str(caught.value)


async def test_a_final_whose_warm_model_the_table_lacks_is_failed_precondition(
    tokenizer: Tokenizer, warm_store: WarmStore, make_ledger: LedgerFactory
) -> None:
    """A WARM record naming a model this replica's table lacks (written by a replica of
    another table on the same Redis): its FINAL is FAILED_PRECONDITION naming the model and
    the table, marked ``table-lacks-model`` (the router's outbox keeps the bill for a replica
    with the model, as it reads the mark: ``failed``); before, the core's assertion reached
    the router as UNKNOWN ("Unexpected <class 'AssertionError'>")."""
    ledger, clock = make_ledger(86_400_000), ManualClock()
    warm_record = ("model-of-another-table", "", Split(10, 0, 0, 0), clock.now_ms())
    await ledger.put_warm("acme", "r1", *warm_record)
    core = PrefixCacheCore(
        table=load_model_table(),
        tokenizer=TokenizerSlot(tokenizer),
        cache=warm_store,
        views=ReplicaViews(65536),
        ledger=ledger,
        clock=clock,
        lookback=20,
    )
    server = grpc.aio.server(interceptors=[InternalAuthInterceptor(TOKEN)])
    prefix_cache_pb2_grpc.add_PrefixCacheServicer_to_server(
        PrefixCacheServicer(PrefixCacheApi(core)), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = prefix_cache_pb2_grpc.PrefixCacheStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Commit(final("r1"), metadata=AUTH)
    finally:
        await server.stop(None)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = err.value.details() or ""
    assert "'model-of-another-table'" in details and "model table lacks" in details
    assert failed(err.value).table_lacks_model


def _lacking(model: str) -> ModelTable:
    """The suite's table without ``model`` (a replica of another table: a rolling deploy)."""
    table = load_model_table()
    no_draft = {"draft_model": None, "draft_tokens": 0, "draft_acceptance_rate": None}
    models = {
        k: v.model_copy(update=no_draft) if v.draft_model == model else v
        for k, v in table.models.items()
        if k != model
    }
    auto = {tier: m if m != model else next(k for k, v in models.items() if v.tier == tier)
            for tier, m in table.auto.items()}  # fmt: skip
    return ModelTable(models=models, auto=auto)


async def test_each_call_naming_a_model_the_table_lacks_is_one_failed_precondition_logged(
    tokenizer: Tokenizer,
    warm_store: WarmStore,
    make_ledger: LedgerFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A replica whose model table lacks ``sim-small`` (which the router's has): its Plan,
    its WARM and a FINAL whose ``baseline_model`` is it (a request naming its model) are each
    FAILED_PRECONDITION naming the model and the table, not the caller's INVALID_ARGUMENT
    (which the router passed on to its caller: the caller's request failed); the replica says
    so in one WARNING naming the model, the next refusals within 10 s counted in the next
    line. Before: INVALID_ARGUMENT "is not a known model", 3 of 3, and no log line."""
    caplog.set_level(logging.INFO, logger="cachemesh.prefix_cache")
    ledger, clock = make_ledger(86_400_000), ManualClock()
    # a WARM taken by a replica with both models, for a request routed to sim-large
    await ledger.put_warm("acme", "r1", "sim-large", "", Split(10, 0, 0, 0), clock.now_ms())
    core = PrefixCacheCore(
        table=_lacking("sim-small"),
        tokenizer=TokenizerSlot(tokenizer),
        cache=warm_store,
        views=ReplicaViews(65536),
        ledger=ledger,
        clock=clock,
        lookback=20,
    )
    server = grpc.aio.server(interceptors=[InternalAuthInterceptor(TOKEN)])
    prefix_cache_pb2_grpc.add_PrefixCacheServicer_to_server(
        PrefixCacheServicer(PrefixCacheApi(core)), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    fin = final("r1")
    fin.baseline_model = "sim-small"
    calls: list[pc.PlanRequest | pc.CommitRequest] = [
        pc.PlanRequest(tenant="acme", model="sim-small", request=request(), replicas=["x"]),
        warm("r2"),
        fin,
    ]
    errors: list[grpc.aio.AioRpcError] = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = prefix_cache_pb2_grpc.PrefixCacheStub(channel)
            for call in calls:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    if isinstance(call, pc.PlanRequest):
                        await stub.Plan(call, metadata=AUTH)
                    else:
                        await stub.Commit(call, metadata=AUTH)
                errors.append(err.value)
            clock.advance(ms=10_000)
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Commit(warm("r3"), metadata=AUTH)
    finally:
        await server.stop(None)
    for error in errors:
        details = error.details() or ""
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, (error.code(), details)
        assert "'sim-small'" in details and "prefix-cache replica's model table" in details
        assert failed(error).table_lacks_model, error.trailing_metadata()  # the router's read
    assert "baseline_model 'sim-small'" in (errors[2].details() or "")
    lines = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 2, [r.getMessage() for r in lines]
    assert all("'sim-small'" in r.getMessage() and "lacks" in r.getMessage() for r in lines)
    assert "2 more since the last such line" in lines[1].getMessage()
    assert await ledger.get("acme", "r1", clock.now_ms()) is not None  # the WARM untouched
    assert await ledger.get("acme", "r2", clock.now_ms()) is None  # nothing written
