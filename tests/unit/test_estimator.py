"""The offline estimator: the stack's own logic in one process, on a virtual clock."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any, Literal

import pytest

from cachemesh.loadtest.reqlog import LogError, LogRecord, read_log, write_log
from cachemesh.loadtest.workloads import Item
from cachemesh.loadtest.workloads.base import TENANT_A, TENANT_B, user
from cachemesh.v1 import gateway_pb2 as pb
from services.common.clock import ManualClock
from services.common.env import Env
from services.semantic_cache.embedder import Embedder, load_minilm_embedder
from services.semantic_cache.operating_point import OperatingPoint
from services.semantic_cache.settings import SemanticCacheSettings
from services.tools.estimator.offline import OfflineStack
from services.tools.estimator.replay import WhatIf, replay
from services.tools.stack.lifecycle import Stack
from tests.unit.semantic_cache_support import FakeEmbedder

ROOT = Path(__file__).resolve().parents[2]
NS = pb.CacheOptions(namespace="ivf-switch")


def _ask(text: str, tenant: str = TENANT_A, **kw: object) -> Item:
    request = pb.CompleteRequest(model="auto", max_tokens=200, messages=[user(text)], **kw)  # type: ignore[arg-type]
    return Item("t", tenant, request)


@pytest.fixture(scope="module")
def settings() -> dict[str, str]:
    return Stack(ROOT, environ={}).settings()


@pytest.fixture(scope="module")
def minilm(settings: dict[str, str]) -> Embedder:
    """The real embedder the offline stack loads (its ORT threads the settings'), loaded once
    for the module: each stack loaded its own (0.27 s of ONNX session each). It holds no
    state between calls (a session and a tokenizer), so no test sees another's."""
    threads = SemanticCacheSettings.from_env(Env(settings), OperatingPoint.load()).ort_threads
    return load_minilm_embedder(threads=threads)


def _replay(
    settings: dict[str, str], minilm: Embedder, records: list[LogRecord], **over: str
) -> list[str]:
    stack = OfflineStack({**settings, **over}, ManualClock(), embedder=minilm)
    return [s.layer if s.ok else s.code for s in asyncio.run(replay(stack, records))]


def test_a_repeat_is_served_by_l1_for_its_tenant_only(
    settings: dict[str, str], minilm: Embedder
) -> None:
    q = "How do I reset my password?"
    records = [LogRecord(0, _ask(q)), LogRecord(1000, _ask(q)), LogRecord(2000, _ask(q, TENANT_B))]
    assert _replay(settings, minilm, records) == ["model", "semantic_cache", "model"]


def test_a_paraphrase_is_served_by_l1_in_a_replay_as_live(
    settings: dict[str, str], minilm: Embedder
) -> None:
    """A replayed Lookup never waits, but its embedding is made whatever the time: a
    paraphrase is an L1 hit offline as it is live, not only an identical text."""
    records = [
        LogRecord(0, _ask("How do I reset my password please?")),
        LogRecord(1000, _ask("How do I reset my password?")),
    ]
    assert _replay(settings, minilm, records) == ["model", "semantic_cache"]


def test_l1_ttl_is_judged_on_the_virtual_clock(settings: dict[str, str], minilm: Embedder) -> None:
    q = "How do I reset my password?"
    records = [LogRecord(0, _ask(q)), LogRecord(59_000, _ask(q)), LogRecord(3_600_000, _ask(q))]
    layers = _replay(settings, minilm, records, SEMANTIC_CACHE_TTL_S="60")
    assert layers == ["model", "semantic_cache", "model"]


def test_a_bad_request_is_counted_by_its_status(settings: dict[str, str], minilm: Embedder) -> None:
    bad = Item("t", TENANT_A, pb.CompleteRequest(model="auto", max_tokens=0, messages=[user("x")]))
    assert _replay(settings, minilm, [LogRecord(0, bad)]) == ["INVALID_ARGUMENT"]


def test_what_if_rewrites_the_logged_requests() -> None:
    request = pb.CompleteRequest(model="sim-large", messages=[user("hi", cache=True)])
    request.tools.add(name="t").cache_control.SetInParent()
    changed = WhatIf(l1=False, l2_ttl="1h", routing="auto").apply(request)
    assert changed.model == "auto" and changed.cache.semantic == pb.SEMANTIC_MODE_BYPASS
    assert changed.tools[0].cache_control.ttl == pb.CACHE_TTL_1H
    assert changed.messages[0].content[0].cache_control.ttl == pb.CACHE_TTL_1H
    assert request.model == "sim-large"  # the log itself is left alone


def test_routing_auto_saves_against_the_logged_models_baseline(
    settings: dict[str, str], minilm: Embedder
) -> None:
    """Traffic logged for the small model, routed by auto to that same model: no saving (the
    baseline of auto is the largest tier's price, which made it 66.7% 'saved')."""
    asked = ["What is 2+2?", "Say hello.", "Spell cat.", "What colour is the sky?"]
    small = [
        pb.CompleteRequest(model="sim-small", max_tokens=50, messages=[user(q)]) for q in asked
    ]
    records = [LogRecord(i * 1000, Item("t", TENANT_A, r)) for i, r in enumerate(small)]
    routings: tuple[Literal["logged", "auto"], ...] = ("logged", "auto")
    for routing in routings:
        stack = OfflineStack(settings, ManualClock(), embedder=minilm)
        for sample in asyncio.run(replay(stack, records, WhatIf(l1=False, routing=routing))):
            if sample.model == "sim-small":
                assert sample.baseline_nanos == sample.cost_nanos  # nothing cached, no saving


def test_the_estimator_runs_each_request_as_the_gateways_complete(
    settings: dict[str, str], minilm: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Complete, not StreamComplete: a replica cut at any point hands the request over."""
    stack = OfflineStack(settings, ManualClock(), embedder=minilm)
    seen: list[object] = []
    run = stack._pipeline.run

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("streamed", True))
        return run(*args, **kwargs)

    monkeypatch.setattr(stack._pipeline, "run", spy)
    asyncio.run(replay(stack, [LogRecord(0, _ask("How do I reset my password?"))]))
    assert seen == [False]


def test_the_estimators_report_holds_no_secret_of_the_shell(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.tools.estimator.cli import main

    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-REALSECRET123")
    monkeypatch.setenv("PREFIX_CACHE_REDIS_URL", "redis://user:hunter2@127.0.0.1:1/0")
    monkeypatch.setenv("SOMETHING_ELSE", "shell-only")
    out = tmp_path / "est.json"
    main(["--workload", "synthetic", "--requests", "2", "--out", str(out)])
    text = out.read_text()
    assert "REALSECRET" not in text and "hunter2" not in text and "shell-only" not in text


def test_an_otlp_header_secret_of_dotenv_is_masked_in_the_estimate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The estimate keeps ``.env``'s names: a hosted OTLP backend's key there is masked."""
    from services.tools.estimator import cli

    root = tmp_path / "repo"
    root.mkdir()
    headers = "x-honeycomb-team=hcaik_SECRET123,authorization=Basic dXNlcjpTRUNSRVQ="
    dotenv = (ROOT / ".env").read_text()
    (root / ".env").write_text(f"{dotenv}\nOTEL_EXPORTER_OTLP_HEADERS={headers}\n")
    monkeypatch.setattr(cli, "ROOT", root)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_HEADERS", raising=False)
    out = tmp_path / "est.json"
    cli.main(["--workload", "synthetic", "--requests", "2", "--out", str(out),
              "--data-dir", str(ROOT.parent / "shared" / "data")])  # fmt: skip
    text = out.read_text()
    assert "SECRET" not in text and "dXNl" not in text
    stack = json.loads(text)["stack"]
    assert stack["OTEL_EXPORTER_OTLP_HEADERS"] == "x-honeycomb-team=***,authorization=***"


def test_the_request_log_round_trips_and_names_a_bad_line(tmp_path: Path) -> None:
    records = [LogRecord(0.0, _ask("a")), LogRecord(5.0, _ask("b", TENANT_B))]
    buffer = io.StringIO()
    write_log(buffer, records)
    path = tmp_path / "log.jsonl"
    path.write_text(buffer.getvalue() + '{"t_ms": 1, "tenant": "x", "request": {"nope": 1}}\n')
    read = read_log(path)
    assert [r.item.request for r in (next(read), next(read))] == [r.item.request for r in records]
    with pytest.raises(LogError, match=r"log\.jsonl:3"):
        next(read)


def test_a_warm_up_request_warms_the_caches_and_stays_out_of_the_totals(
    settings: dict[str, str], minilm: Embedder, tmp_path: Path
) -> None:
    """cachemesh-load's report leaves its --warmup requests out; the estimate of its log must
    too, or its request count and bill are the live run's plus the warm-up's."""
    from cachemesh.loadtest.stats import summarise

    q = "How do I reset my password?"
    buffer = io.StringIO()
    write_log(buffer, [LogRecord(0, _ask(q), warmup=True), LogRecord(1000, _ask(q))])
    path = tmp_path / "log.jsonl"
    path.write_text(buffer.getvalue())
    records = list(read_log(path))
    assert [r.warmup for r in records] == [True, False]
    samples = asyncio.run(replay(OfflineStack(settings, ManualClock(), embedder=minilm), records))
    results = summarise(samples, {}, wall_s=0.0)
    assert results["requests"] == 1
    assert results["served_by"] == {"semantic_cache": 1}  # the warm-up's answer, from L1
    path.write_text('{"t_ms": 0, "tenant": "x", "warmup": "yes", "request": {}}\n')
    with pytest.raises(LogError, match="warmup must be true or false"):
        list(read_log(path))


def test_a_scope_over_the_ivf_size_switches_index_offline_as_it_does_live(
    settings: dict[str, str],
) -> None:
    """The estimator builds the cache through the service's own wiring (build_cache), so a
    scope that grows past SEMANTIC_CACHE_ANN_MIN_ENTRIES is rebuilt as IVF here too."""
    over = {**settings, "SEMANTIC_CACHE_ANN_MIN_ENTRIES": "40"}
    stack = OfflineStack(over, ManualClock(), embedder=FakeEmbedder())
    records = [
        LogRecord(i * 10, _ask(f"question about topic {i} and thing {i * 7}", cache=NS))
        for i in range(60)
    ]
    layers = [s.layer for s in asyncio.run(replay(stack, records))]
    assert layers == ["model"] * 60
    (scope,) = stack.semantic_cache._scopes.values()
    scope.wait_for_rebuild()
    assert scope.kind == "ivf" and len(scope) == 60


def test_a_replayed_lookup_makes_the_embedding_auto_wants_in_a_scope_with_nothing_yet(
    settings: dict[str, str],
) -> None:
    """A replayed Lookup never waits (its lease wait is on the virtual clock), but what it
    computes takes no virtual time: the embedding ``auto`` wants is made as live, or the
    router scores the question otherwise and the estimate picks another tier than live did."""
    from cachemesh.v1 import semantic_cache_pb2 as sc
    from services.common.env import Env
    from services.semantic_cache.operating_point import OperatingPoint
    from services.semantic_cache.settings import SemanticCacheSettings
    from services.semantic_cache.wiring import build_api
    from services.tools.estimator.local_adapters import LocalSemantic
    from services.tools.estimator.timeline import CURRENT, Timeline, VirtualTime

    stack = OfflineStack(settings, ManualClock(), embedder=FakeEmbedder())
    own = SemanticCacheSettings.from_env(Env(settings), OperatingPoint.load())
    semantic = LocalSemantic(build_api(own, stack.semantic_cache))
    request = sc.LookupRequest(
        tenant=TENANT_A, request=_ask("a question in a scope with nothing yet").request,
        want_embedding=True,
    )  # fmt: skip

    async def look() -> sc.LookupResponse:
        CURRENT.set(Timeline(VirtualTime(stack.clock), 0, 0, None))
        return await semantic.lookup(request, 2.0)

    response = asyncio.run(look())
    assert not response.hit and len(response.embedding) > 0


def test_the_request_rate_limit_is_replayed_as_the_gateway_applies_it(
    settings: dict[str, str],
    minilm: Embedder,
) -> None:
    """ROUTER_LIMIT_REQUESTS_PER_MIN=2: live, the third and fourth request of a tenant within
    the minute are refused (RESOURCE_EXHAUSTED, not billed); the estimate listed the limit as
    replayed and served all four."""
    records = [LogRecord(i * 10, _ask(f"question number {i}?")) for i in range(4)]
    records.append(LogRecord(40, _ask("another tenant's question?", TENANT_B)))
    layers = _replay(settings, minilm, records, ROUTER_LIMIT_REQUESTS_PER_MIN="2")
    assert layers == ["model", "model", "RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED", "model"]


def test_a_spent_budget_is_replayed_even_with_the_limits_in_redis(
    settings: dict[str, str],
    minilm: Embedder,
) -> None:
    """A budget of 0 refuses every request; a stack that keeps its counts in Redis is replayed
    with the counts in this process (nothing is dialled offline)."""
    over = {"ROUTER_BUDGET_USD_PER_DAY": "0", "ROUTER_LIMITS_REDIS_URL": "redis://127.0.0.1:1/0"}
    layers = _replay(settings, minilm, [LogRecord(0, _ask("How do I reset my password?"))], **over)
    assert layers == ["RESOURCE_EXHAUSTED"]


def test_a_request_that_failed_live_is_counted_as_it_ended_live(
    settings: dict[str, str], minilm: Embedder, tmp_path: Path
) -> None:
    """The log holds each request's live status: one cut by its deadline live is replayed until
    its logged end and cut there, counted as it ended, an error billed nothing, so the
    estimate's bill compares with the live one. Its cut call stored nothing in L1, as live: the
    same question asked again is a model call, billed, not a free L1 hit."""
    from cachemesh.loadtest.stats import summarise

    q = "How do I reset my password?"
    buffer = io.StringIO()
    write_log(
        buffer,
        [
            LogRecord(0, _ask(q), 100.0, code="DEADLINE_EXCEEDED"),
            LogRecord(1000, _ask(q), 100.0, code="OK"),
        ],
    )
    path = tmp_path / "log.jsonl"
    path.write_text(buffer.getvalue())
    records = list(read_log(path))
    assert [r.code for r in records] == ["DEADLINE_EXCEEDED", "OK"]
    results = summarise(
        asyncio.run(replay(OfflineStack(settings, ManualClock(), embedder=minilm), records)), {}
    )
    assert results["errors"] == {"DEADLINE_EXCEEDED": 1}
    assert results["served_by"] == {"model": 1}  # the cut call's answer was never stored
    assert results["cost"]["cost_nanos"] > 0


def _cost(settings: dict[str, str], minilm: Embedder, record: LogRecord) -> int:
    stack = OfflineStack(settings, ManualClock(), embedder=minilm)
    (sample,) = asyncio.run(replay(stack, [record]))
    return sample.cost_nanos


@pytest.mark.parametrize("budget_over_partial", [True, False])
def test_a_request_cut_live_counts_against_the_budget_as_its_partial_bill(
    settings: dict[str, str], minilm: Embedder, budget_over_partial: bool
) -> None:
    """Live, a call cut at its deadline after its prefill is billed for what it produced (its
    prompt), and that bill, not its whole answer's, counts against the tenant's budget: a
    daily budget a nano-dollar short of the whole answer's admits the next request, one of a
    nano-dollar (spent by any bill) refuses it."""
    q = "How do I reset my password?"
    whole = _cost(settings, minilm, LogRecord(0, _ask(q), 100.0, code="OK"))
    budget = whole - 1 if budget_over_partial else 1
    records = [
        LogRecord(0, _ask(q), 100.0, code="DEADLINE_EXCEEDED"),
        LogRecord(1000, _ask("Something else entirely?"), 100.0, code="OK"),
    ]
    layers = _replay(settings, minilm, records, ROUTER_BUDGET_USD_PER_DAY=f"{budget / 1e9:.9f}")
    assert layers[0] == "DEADLINE_EXCEEDED"
    assert layers[1] == ("model" if budget_over_partial else "RESOURCE_EXHAUSTED")


def test_a_daily_budget_renews_a_day_into_the_log_not_at_a_fixed_hour(
    settings: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The log's times are relative: the replay starts at a UTC midnight, and says so. It
    started at 22:13:20 UTC, so a daily budget renewed 1 h 46 min 40 s into every replay (a
    3-hour log was allowed two days' budgets, live one)."""
    from services.tools.estimator.cli import main

    day_ms = 86_400_000
    times = [0, 2 * 3_600_000, day_ms - 1, day_ms, day_ms + 2 * 3_600_000]
    path, out = tmp_path / "log.jsonl", tmp_path / "est.json"
    with path.open("w") as handle:
        write_log(handle, [LogRecord(t, _ask(f"question number {t}?")) for t in times])
    main(["--log", str(path), "--out", str(out), "--set", "ROUTER_BUDGET_USD_PER_DAY=0.000000001"])
    doc = json.loads(out.read_text())
    assert doc["results"]["served_by"] == {"model": 2}  # the first request of each day
    assert doc["results"]["errors"] == {"RESOURCE_EXHAUSTED": 3}
    assert doc["source"]["clock_start"] == "2024-01-01T00:00:00Z"
    assert "taken to start at 2024-01-01T00:00:00Z" in capsys.readouterr().err


def test_a_log_without_live_statuses_still_reads_and_a_bad_one_is_named(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text('{"t_ms": 0, "tenant": "x", "request": {}}\n')
    assert [r.code for r in read_log(path)] == [None]
    path.write_text('{"t_ms": 0, "tenant": "x", "code": 8, "request": {}}\n')
    with pytest.raises(LogError, match="code must be a status name"):
        list(read_log(path))


@pytest.mark.parametrize("waits_on_its_twin", [True, False])
def test_a_request_cut_before_its_model_call_gives_its_reservation_back_as_live(
    settings: dict[str, str], minilm: Embedder, waits_on_its_twin: bool
) -> None:
    """Live (f0b22cf), a call that ends before its model call was sent gives its token
    reservation (prompt + max_tokens) back whole; the replay, through the Gateway's own rule
    (``Limiter.finish``), does too. The second request, cut by its deadline at 110 ms while it
    waited on the first's identical call (L1's single flight), kept its ~208 tokens in the
    replay: under 500 tokens a minute the third request, at 120 ms, found ~85 left and was
    refused; live it is admitted. One cut after its model call was sent, before its prefill
    was reported (SIM_TIME_SCALE=0: the replica reports it at the logged end), was billed
    nothing and keeps its reservation, as live: the third is refused."""
    q = "How do I reset my password?"
    second = q if waits_on_its_twin else "Something else entirely, please?"
    records = [
        LogRecord(0, _ask(q), 1000.0, code="OK"),
        LogRecord(10, _ask(second), 100.0, code="DEADLINE_EXCEEDED"),
        LogRecord(120, _ask("A third question?"), 100.0, code="OK"),
    ]
    over = {"ROUTER_LIMIT_TOKENS_PER_MIN": "500", "SIM_TIME_SCALE": "0"}
    layers = _replay(settings, minilm, records, **over)
    third = "model" if waits_on_its_twin else "RESOURCE_EXHAUSTED"
    assert layers == ["model", "DEADLINE_EXCEEDED", third]


def test_a_request_its_replica_refused_gives_its_reservation_back_as_live(
    settings: dict[str, str],
    minilm: Embedder,
) -> None:
    """Live, a call whose every model call its replica refused before its start (nothing
    produced, nothing billed) gives its token reservation back whole; the replay, through the
    Gateway's own rule (``ModelUse.model_refused``, ``Limiter.finish``), does too. sim-large's
    context window shrunk to 8 tokens, its replica refuses the first request's prompt
    (RESOURCE_EXHAUSTED): before, its ~310 tokens (prompt + max_tokens 300) stayed reserved,
    and under 500 tokens a minute the second request, 10 ms later, was refused too."""
    ask = "How do I reset my password?"
    refused = pb.CompleteRequest(model="sim-large", max_tokens=300, messages=[user(ask)])
    second = pb.CompleteRequest(model="sim-small", max_tokens=300, messages=[user("Another?")])
    records = [
        LogRecord(0, Item("t", TENANT_A, refused), 100.0, code="RESOURCE_EXHAUSTED"),
        LogRecord(10, Item("t", TENANT_A, second), 100.0, code="OK"),
    ]
    over = {"ROUTER_LIMIT_TOKENS_PER_MIN": "500", "CACHEMESH_CONTEXT_WINDOWS": "sim-large=8"}
    assert _replay(settings, minilm, records, **over) == ["RESOURCE_EXHAUSTED", "model"]
