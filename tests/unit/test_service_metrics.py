"""Each service's metrics, piece by piece: what a request, a store, a bill or a Generate adds.

The whole stack's figures against the responses are checked by
tests/integration/test_metrics_logs.py; here each recorder is fed known events.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from prometheus_client import CollectorRegistry

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from services.common.clock import ManualClock
from services.common.env import Env
from services.common.keyfile import TENANT_PATTERN
from services.common.logs import JsonLines, configure_logging
from services.common.metrics import NONE, OTHER, TenantLabels, new_registry
from services.common.models import load_model_table
from services.common.tokens import load_cl100k
from services.model.metrics import ModelMetrics
from services.prefix_cache.commit_records import CommitRecords
from services.prefix_cache.core import PrefixCacheCore, TokenizerSlot
from services.prefix_cache.ledger import InMemoryLedger
from services.prefix_cache.metrics import PrefixCacheMetrics
from services.prefix_cache.replica_view import ReplicaViews
from services.prefix_cache.totals import TotalsLedger
from services.prefix_cache.warm import InMemoryWarmStore
from services.router.access_log import RequestLog
from services.router.metrics import RouterMetrics, decision_reason
from services.router.routing.decision import Decision
from services.semantic_cache.metrics import SemanticCacheMetrics, StoreCollector, refusal_reason
from services.semantic_cache.records import Answer, CheckResult, Entry
from services.semantic_cache.stats import StoreStats, entry_bytes

TABLE = load_model_table()


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


class Ticks:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def logs() -> Iterator[Callable[[dict[str, str]], tuple[io.StringIO, JsonLines | None]]]:
    """Configures logging into a buffer (the settings given); puts the root logger back."""
    root, ours = logging.getLogger(), logging.getLogger("cachemesh")
    handlers, level, our_level = list(root.handlers), root.level, ours.level

    def configure(environ: dict[str, str]) -> tuple[io.StringIO, JsonLines | None]:
        out = io.StringIO()
        return out, configure_logging(Env(environ), out)

    yield configure
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    ours.setLevel(our_level)


def _answer(layer: pb.Layer.ValueType, cost: int, baseline: int) -> pb.CompleteResponse:
    return pb.CompleteResponse(
        served_by=layer,
        model="sim-small",
        tier="small",
        usage=pb.Usage(
            input_tokens=10, cache_creation_input_tokens=3, cache_read_input_tokens=5,
            output_tokens=7,
        ),
        cost=pb.Cost(cost_nanos=cost, baseline_nanos=baseline, saved_nanos=baseline - cost),
    )  # fmt: skip


def test_router_counts_what_the_responses_say_and_logs_one_line_each(
    logs: Callable[[dict[str, str]], tuple[io.StringIO, JsonLines | None]],
) -> None:
    access_lines, lines = logs({})
    assert lines is not None  # JSON: the access log writes its lines itself
    registry = new_registry()
    ticks = Ticks()
    log = RequestLog(RouterMetrics(registry, TenantLabels(1)), TABLE, ticks, lines)
    request = pb.CompleteRequest(model="sim-small", request_id="r-1")
    for tenant, end in (
        ("a", _answer(pb.LAYER_MODEL, 900, 1000)),
        ("a", _answer(pb.LAYER_MODEL, 1300, 1000)),  # a cache write: saved -300
        ("b", _answer(pb.LAYER_SEMANTIC_CACHE, 0, 1000)),  # past the cap of 1: "other"
    ):
        call = log.begin("Complete")
        call.tenant, call.end = tenant, end
        ticks.now += 0.25
        log.finish(call, request, "OK")
    refused = log.begin("Complete")
    log.finish(refused, pb.CompleteRequest(model="no-such-model"), "UNAUTHENTICATED")

    model = {"tenant": "a", "served_by": "model"}
    assert value(registry, "cachemesh_router_cost_nanos_total", **model) == 2200
    assert value(registry, "cachemesh_router_baseline_nanos_total", **model) == 2000
    assert value(registry, "cachemesh_router_saved_nanos", **model) == -200
    assert value(registry, "cachemesh_router_tokens_total", type="cache_read", **model) == 10
    hit = {"tenant": OTHER, "served_by": "semantic_cache"}
    assert value(registry, "cachemesh_router_saved_nanos", **hit) == 1000
    requests = {"tenant": "a", "model": "sim-small", "tier": "small", "served_by": "model"}
    assert value(registry, "cachemesh_router_requests_total", **requests) == 2
    assert value(
        registry, "cachemesh_router_errors_total", tenant=NONE, code="UNAUTHENTICATED", deadline=""
    )
    assert (
        value(registry, "cachemesh_router_request_duration_seconds_sum", served_by="model") == 0.5
    )
    assert value(registry, "cachemesh_router_requests_in_flight") == 0

    written = [json.loads(line) for line in access_lines.getvalue().splitlines()]
    assert len(written) == 4 and {line["logger"] for line in written} == {"cachemesh.access"}
    first = written[0]
    assert (first["tenant"], first["served_by"], first["status"], first["saved_nanos"]) == (
        "a",
        "model",
        "OK",
        100,
    )
    assert (first["cost_nanos"], first["output_tokens"], first["duration_ms"]) == (900, 7, 250.0)
    assert written[2]["tenant"] == "b"  # the log keeps the tenant; only the label is capped
    assert (written[3]["status"], written[3]["requested_model"], written[3]["tenant"]) == (
        "UNAUTHENTICATED",
        "?",  # not in the table: the caller's free text stays out of the log
        "",
    )


def test_the_access_line_in_text_format_has_the_same_fields(
    logs: Callable[[dict[str, str]], tuple[io.StringIO, JsonLines | None]],
) -> None:
    out, lines = logs({"CACHEMESH_LOG_FORMAT": "text"})
    assert lines is None
    log = RequestLog(RouterMetrics(new_registry(), TenantLabels(1)), TABLE, Ticks(), lines)
    call = log.begin("StreamComplete")
    call.tenant, call.end = "a", _answer(pb.LAYER_MODEL, 900, 1000)
    log.finish(call, pb.CompleteRequest(model="auto", request_id="r-9"), "OK")
    text = out.getvalue()
    assert "cachemesh.access: access tenant=a request_id=r-9 method=StreamComplete" in text
    assert "saved_nanos=100 cost_estimated=False" in text


def test_the_access_log_is_off_above_info(
    logs: Callable[[dict[str, str]], tuple[io.StringIO, JsonLines | None]],
) -> None:
    out, lines = logs({"CACHEMESH_LOG_LEVEL": "WARNING"})
    registry = new_registry()
    log = RequestLog(RouterMetrics(registry, TenantLabels(1)), TABLE, Ticks(), lines)
    call = log.begin("Complete")
    call.tenant, call.end = "a", _answer(pb.LAYER_MODEL, 900, 1000)
    log.finish(call, pb.CompleteRequest(model="auto"), "OK")
    assert out.getvalue() == ""
    assert (
        value(registry, "cachemesh_router_cost_nanos_total", tenant="a", served_by="model") == 900
    )


def test_router_decision_reasons_are_a_closed_set() -> None:
    def decision(threshold: float, base: float, moved: bool = False) -> Decision:
        return Decision("large", 0.7, threshold, base, "score 0.700 >= threshold", "lookup", moved)

    assert decision_reason("requested", None) == "requested"
    assert decision_reason("fallback: sim-large unavailable", decision(0.5, 0.5)) == "fallback"
    assert decision_reason("score ...", decision(0.5, 0.5)) == "threshold"
    assert decision_reason("score ... medium band", decision(0.25, 0.5)) == "threshold"
    assert decision_reason("kept on the ...", decision(0.61, 0.5, moved=True)) == "cost_aware"


def test_router_genai_metrics_count_the_whole_prompt_as_input() -> None:
    registry = new_registry()
    metrics = RouterMetrics(registry, TenantLabels(10))
    metrics.model_call("anthropic", "m", "m", _answer(pb.LAYER_MODEL, 1, 1).usage, 0.5)
    metrics.model_call("anthropic", "m", "m", None, 0.1, "replica_cut")
    names = {
        "gen_ai_operation_name": "chat",
        "gen_ai_provider_name": "anthropic",
        "gen_ai_request_model": "m",
        "gen_ai_response_model": "m",
    }
    assert (
        value(registry, "gen_ai_client_token_usage_sum", gen_ai_token_type="input", **names) == 18
    )
    assert (
        value(registry, "gen_ai_client_token_usage_sum", gen_ai_token_type="output", **names) == 7
    )
    assert (
        value(registry, "gen_ai_client_operation_duration_seconds_count", error_type="", **names)
        == 1
    )
    assert (
        value(
            registry,
            "gen_ai_client_operation_duration_seconds_count",
            error_type="replica_cut",
            **names,
        )
        == 1
    )


def _entry(tenant: str, query: str, payload: bytes) -> Entry:
    return Entry(
        entry_id=query, tenant=tenant, scope="s", namespace="", query=query,
        answer=Answer(payload, "end_turn", 3, False), created_at_ms=0, embedder_version="v",
    )  # fmt: skip


def test_no_tenant_can_be_named_like_the_shared_labels() -> None:
    """The overflow and the no-tenant labels are names no tenant may take: a tenant called
    ``other`` or ``none`` keeps its own series instead of merging with everyone past the cap
    (or with the refused requests)."""
    assert not TENANT_PATTERN.match(OTHER) and not TENANT_PATTERN.match(NONE)
    labels = TenantLabels(2)
    assert [labels(t) for t in ("other", "none", "c", "")] == ["other", "none", OTHER, NONE]


def test_semantic_cache_sizes_by_tenant_capped_into_other() -> None:
    stats = StoreStats()
    entries = [
        _entry(t, q, b"x" * 10) for t, q in (("a", "q1"), ("a", "q2"), ("b", "q"), ("c", "q"))
    ]
    for entry in entries:
        stats.added(entry, 384)
    stats.removed(entries[1], 384)
    stats.evictions, stats.expirations = 2, 1
    registry = CollectorRegistry()
    registry.register(StoreCollector(stats, max_tenants=1))
    size = entry_bytes(entries[0], 384)
    assert size == 10 + 2 + 4 * 384
    held = {t: value(registry, "cachemesh_semantic_cache_entries", tenant=t) for t in "abc"}
    assert held == {"a": 1, "b": 0, "c": 0}  # one kept by the cap; the others are "other"
    assert value(registry, "cachemesh_semantic_cache_entries", tenant=OTHER) == 2
    assert value(registry, "cachemesh_semantic_cache_bytes", tenant="a") == size
    assert value(registry, "cachemesh_semantic_cache_evictions_total") == 2
    assert value(registry, "cachemesh_semantic_cache_expirations_total") == 1


def test_semantic_cache_lookups_by_result() -> None:
    registry = new_registry()
    metrics = SemanticCacheMetrics(registry, TenantLabels(10))
    entry = _entry("a", "q", b"")
    for result in (
        CheckResult(entry, exact=True, similarity=1.0),
        CheckResult(entry, similarity=0.9),
        CheckResult(None, refusal="the verifier refused the nearest candidate"),
        CheckResult(None, skip_reason="semantic mode bypass skips the read"),
        CheckResult(None, pending=True),
    ):
        metrics.looked_up("a", result)
    counts = {
        r: value(registry, "cachemesh_semantic_cache_lookups_total", tenant="a", result=r)
        for r in ("exact", "paraphrase", "miss", "skipped", "pending")
    }
    assert counts == dict.fromkeys(counts, 1.0)
    assert value(registry, "cachemesh_semantic_cache_hits_total", tenant="a", kind="exact") == 1
    assert value(registry, "cachemesh_semantic_cache_refusals_total", reason="verifier") == 1
    assert refusal_reason("ambiguous: two cached answers fit about equally well") == "ambiguous"


async def test_prefix_cache_bills_are_counted_once_a_retried_final_counts_nothing() -> None:
    registry = new_registry()
    metrics = PrefixCacheMetrics(registry)
    clock = ManualClock()
    core = PrefixCacheCore(
        table=TABLE,
        tokenizer=TokenizerSlot(load_cl100k()),
        cache=InMemoryWarmStore(),
        views=ReplicaViews(1024),
        ledger=InMemoryLedger(CommitRecords(3_600_000), TotalsLedger()),
        clock=clock,
        lookback=20,
        metrics=metrics,
    )
    request = pb.CompleteRequest(
        model="sim-small",
        max_tokens=50,
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="Hello there")])],
    )
    await core.plan("a", "sim-small", request, ["r"])
    warm = await core.warm("a", "id-1", "sim-small", request, "r")
    first = await core.final("a", "id-1", "sim-small", 12, 0, "sim-small")
    again = await core.final("a", "id-1", "sim-small", 12, 0, "sim-small")
    assert again == first
    model = {"model": "sim-small"}
    assert value(registry, "cachemesh_prefix_cache_tokens_total", kind="output", **model) == 12
    uncached = value(registry, "cachemesh_prefix_cache_tokens_total", kind="uncached", **model)
    assert uncached == warm.input_tokens > 0
    assert value(registry, "cachemesh_prefix_cache_bills_total", reconciled="false", **model) == 1
    cost = value(registry, "cachemesh_prefix_cache_cost_nanos_total", **model)
    assert cost == first.charge.cost_nanos
    assert value(registry, "cachemesh_prefix_cache_plans_total", **model) == 1
    assert await core.warm_prefixes() == 0  # too short to cache


async def _chunks() -> AsyncIterator[model_pb2.GenerateChunk]:
    yield model_pb2.GenerateChunk(
        start=model_pb2.GenerateStart(prompt_tokens=40, kv_cached_tokens=32)
    )
    yield model_pb2.GenerateChunk(text="Hello")
    yield model_pb2.GenerateChunk(text=" world")
    yield model_pb2.GenerateChunk(
        end=model_pb2.GenerateEnd(output_tokens=11, stop_reason="end_turn")
    )


async def test_model_metrics_follow_the_generate_stream() -> None:
    registry = new_registry()
    ticks = Ticks()
    metrics = ModelMetrics(registry, ["sim-small"], ticks)
    call = metrics.begin("sim-small")
    assert value(registry, "cachemesh_model_in_flight", model="sim-small") == 1
    async for chunk in _chunks():
        ticks.now += 0.5
        metrics.chunk(call, chunk)
    metrics.end(call, "ok")
    other = metrics.begin("gpt-unknown")
    metrics.end(other, "refused")
    model = {"model": "sim-small"}
    assert value(registry, "cachemesh_model_in_flight", **model) == 0
    assert value(registry, "cachemesh_model_prompt_tokens_total", **model) == 40
    assert value(registry, "cachemesh_model_kv_cached_tokens_total", **model) == 32
    assert value(registry, "cachemesh_model_output_tokens_total", **model) == 11
    assert value(registry, "cachemesh_model_time_to_first_token_seconds_sum", **model) == 1.0
    # 10 tokens after the first content, over the 1.0 s from it to the end
    assert value(registry, "cachemesh_model_decode_tokens_per_second_sum", **model) == 10.0
    assert value(registry, "cachemesh_model_generations_total", model=OTHER, outcome="refused")


def test_model_metrics_count_the_fair_queue_by_model_and_bounded_tenants() -> None:
    registry = new_registry()
    metrics = ModelMetrics(registry, ["sim-small"], Ticks(), TenantLabels(1))
    metrics.waiting("tenant-b", 1)
    metrics.waiting("tenant-b", 1)
    metrics.waiting("tenant-c", 1)  # past the cap: _other
    metrics.waiting("tenant-b", -1)
    metrics.queue_wait("sim-small", 0.2)
    metrics.queue_wait("gpt-unknown", 0.5)
    assert value(registry, "cachemesh_model_queue_waiting", tenant="tenant-b") == 1
    assert value(registry, "cachemesh_model_queue_waiting", tenant=OTHER) == 1
    assert value(registry, "cachemesh_model_queue_wait_seconds_sum", model="sim-small") == 0.2
    assert value(registry, "cachemesh_model_queue_wait_seconds_count", model=OTHER) == 1


async def test_a_thinking_models_first_token_is_its_first_piece_of_thinking() -> None:
    """The model's time to first token is its first output of any kind (its thinking here, a
    ``progress`` chunk), not the first text the client sees; the decode rate counts the
    thinking's tokens over the time from it."""
    registry = new_registry()
    ticks = Ticks()
    metrics = ModelMetrics(registry, ["local-small"], ticks)
    call = metrics.begin("local-small")
    chunks = [
        model_pb2.GenerateChunk(start=model_pb2.GenerateStart(prompt_tokens=40)),
        *[
            model_pb2.GenerateChunk(progress=model_pb2.GenerateProgress(output_tokens=n))
            for n in (5, 10)
        ],
        model_pb2.GenerateChunk(text="Paris."),
        model_pb2.GenerateChunk(
            end=model_pb2.GenerateEnd(output_tokens=13, stop_reason="end_turn")
        ),
    ]
    for chunk in chunks:
        ticks.now += 0.5
        metrics.chunk(call, chunk)
    metrics.end(call, "ok")
    model = {"model": "local-small"}
    # the first piece of thinking came 1.0 s in (the text 2.0 s in)
    assert value(registry, "cachemesh_model_time_to_first_token_seconds_sum", **model) == 1.0
    # 12 tokens after the first, over the 1.5 s from it to the end
    assert value(registry, "cachemesh_model_decode_tokens_per_second_sum", **model) == 8.0
