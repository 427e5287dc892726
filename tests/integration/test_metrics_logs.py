"""Metrics, the dashboard and the logs on a running stack of their own (issue 16, points 1-3).

A fresh stack (its counters start at zero; cachemesh's loggers at DEBUG, so every service
writes lines inside each request) answers a known set of requests: misses on both tiers and
both tenants, an exact and a paraphrase L1 hit, an agent's second turn that reads the prefix
cache, an ``auto`` request, a streamed one, one through the HTTP front, and two refusals.
Then every process's ``GET /metrics`` is scraped, and each figure must be exactly what the
responses reported: requests by tenant, model, tier and layer; cost, baseline and saved
nano-dollars; tokens; the bills prefix-cache made; what the model replicas generated; the
calls the router made against the calls the services received. The dashboard's queries and
the alert rules must name only metrics the services expose. The logs: every line is one JSON
object, every line written while a request was in flight carries a trace id, each answer's
trace id is on its access-log line (whose fields are the response's) and on the lines of
every service it reached, and no question asked, API key or internal token appears in any
log or metric.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from cachemesh import AuthenticationError, Client, InvalidRequestError, answer_text, build_request
from cachemesh.envfile import read_env_file
from cachemesh.v1 import gateway_pb2 as pb
from services.common.metrics import NONE
from services.router.metrics import LAYERS
from services.tools.stack.lifecycle import Stack
from services.tools.stack.service_table import SERVICES
from tests.integration.harness import ROOT, started_stack
from tests.integration.prompts import agent_request

pytestmark = pytest.mark.integration

DASHBOARD = ROOT / "services" / "observability" / "grafana" / "dashboards" / "cachemesh.json"
ALERTS = ROOT / "services" / "observability" / "prometheus" / "alerts.yml"
SETTINGS = {
    "CACHEMESH_LOG_LEVEL": "DEBUG",  # every service writes lines inside each request
    "SEMANTIC_CACHE_SNAPSHOT_S": "0",  # no periodic save in the middle of the requests
}


@dataclass
class Answered:
    tenant: str
    response: pb.CompleteResponse
    question: str


@dataclass
class Run:
    stack: Stack
    keys: dict[str, str]
    internal_token: str
    answers: list[Answered] = field(default_factory=list)
    # each service's log, in complete lines, before the calls began and once they ended (their
    # Stores arrived): the stretch the calls wrote, no other test's
    log_marks: dict[str, tuple[int, int]] = field(default_factory=dict)
    questions: list[str] = field(default_factory=list)
    http_trace_id: str = ""
    http_refused_id: str = ""  # the request id of the front's own refusal (a wrong key)
    http_wrong_key: str = ""

    def ask(self, tenant: str, request: pb.CompleteRequest, *, stream: bool = False) -> None:
        question = request.messages[-1].content[-1].text
        self.questions.append(question)
        with Client(self.stack.router_address, api_key=self.keys[tenant]) as client:
            if stream:
                chunks = list(client.stream(request))
                response = chunks[-1].end
            else:
                response = client.complete(request)
        self.answers.append(Answered(tenant, response, question))


def _ns() -> str:
    return uuid.uuid4().hex[:12]


def _drive(run: Run) -> None:
    ns_a, ns_b, marker = _ns(), _ns(), _ns()
    reset = "How do I reset my password?"
    run.ask("tenant-a", build_request(reset, model="sim-small", namespace=ns_a))
    run.ask("tenant-a", build_request(reset, model="sim-small", namespace=ns_a))  # exact hit
    forgot = "I forgot my password, how can I change it?"
    run.ask("tenant-a", build_request(forgot, model="sim-large", namespace=ns_a + "p"))
    run.ask("tenant-a", build_request(reset, model="sim-large", namespace=ns_a + "p"))  # paraphrase
    first = agent_request(marker, ["Please look up reservation ZFA04Y."])
    run.ask("tenant-a", first)
    turn = answer_text(run.answers[-1].response)
    run.ask(
        "tenant-a",
        agent_request(
            marker, ["Please look up reservation ZFA04Y.", "Now move it to May 17."], [turn]
        ),
    )  # reads the prefix cache
    auto = "Prove that the square root of two is irrational, step by step."
    run.ask("tenant-b", build_request(auto, model="auto", namespace=ns_b))
    run.ask(
        "tenant-b", build_request("What is the capital of Australia?", namespace=ns_b), stream=True
    )
    address = run.stack.router_address
    with Client(address, api_key="cm_not-a-key") as stranger, pytest.raises(AuthenticationError):
        stranger.complete(build_request("Who am I?"))
    with (
        Client(address, api_key=run.keys["tenant-a"]) as client,
        pytest.raises(InvalidRequestError),
    ):
        client.complete(build_request("Too short?", max_tokens=0))
    _http_ask(run, "What colour is the sky on a clear day?")
    _http_refused(run)


def _http_refused(run: Run) -> None:
    """A call the HTTP front refuses itself (a key one character off): the router never sees
    it; the front writes its access line."""
    key = run.keys["tenant-b"]
    run.http_wrong_key = key[:-1] + ("A" if key[-1] != "A" else "B")
    request = urllib.request.Request(
        f"http://{run.stack.addresses['http-front']}/v1/messages",
        data=b'{"model": "sim-small", "max_tokens": 8, "messages": []}',
        headers={"x-api-key": run.http_wrong_key, "anthropic-version": "2023-06-01"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 401
    run.http_refused_id = refused.value.headers["request-id"]


def _http_ask(run: Run, question: str) -> None:
    """One Anthropic Messages call through the HTTP front: an answer the router also counts."""
    run.questions.append(question)
    body = {
        "model": "sim-small",
        "max_tokens": 256,
        "messages": [{"role": "user", "content": question}],
    }
    request = urllib.request.Request(
        f"http://{run.stack.addresses['http-front']}/v1/messages",
        data=json.dumps(body).encode(),
        headers={
            "content-type": "application/json",
            "x-api-key": run.keys["tenant-b"],
            "anthropic-version": "2023-06-01",
        },
    )
    with urllib.request.urlopen(request, timeout=60) as reply:
        headers, message = reply.headers, json.loads(reply.read())
    usage = message["usage"]
    response = pb.CompleteResponse(
        served_by=pb.LAYER_MODEL
        if headers["x-cachemesh-served-by"] == "model"
        else pb.LAYER_UNSPECIFIED,
        model=headers["x-cachemesh-model"],
        tier=headers["x-cachemesh-tier"],
        trace_id=headers["x-cachemesh-trace-id"],
        usage=pb.Usage(
            input_tokens=usage["input_tokens"],
            cache_creation_input_tokens=usage.get("cache_creation_input_tokens") or 0,
            cache_read_input_tokens=usage.get("cache_read_input_tokens") or 0,
            output_tokens=usage["output_tokens"],
        ),
        cost=pb.Cost(
            cost_nanos=int(headers["x-cachemesh-cost-nanos"]),
            baseline_nanos=int(headers["x-cachemesh-baseline-nanos"]),
            saved_nanos=int(headers["x-cachemesh-saved-nanos"]),
        ),
    )
    assert response.served_by == pb.LAYER_MODEL, headers["x-cachemesh-served-by"]
    run.answers.append(Answered("tenant-b", response, question))
    run.http_trace_id = response.trace_id


class Scrape:
    """Every sample of one ``GET /metrics``, and the metric families it declares."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: list[tuple[str, dict[str, str], float]] = []
        self.families: dict[str, str] = {}  # name -> type
        for family in text_string_to_metric_families(text):
            self.families[family.name] = family.type
            for sample in family.samples:
                self.samples.append((sample.name, dict(sample.labels), sample.value))

    def value(self, name: str, **labels: str) -> float:
        """The sum of ``name``'s samples whose labels include ``labels``."""
        return sum(
            v
            for n, have, v in self.samples
            if n == name and all(have.get(k) == want for k, want in labels.items())
        )

    def names(self) -> set[str]:
        return {n for n, _, _ in self.samples}


def _scrape(address: str) -> Scrape:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        return Scrape(reply.read().decode())


def _scrapes(stack: Stack) -> dict[str, Scrape]:
    return {name: _scrape(address) for name, address in stack.metrics_addresses.items()}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    run_dir = tmp_path_factory.mktemp("metrics-run")
    with started_stack(run_dir, SETTINGS) as (stack, _sink):
        demo = read_env_file(run_dir / "demo-keys.env")
        keys = {"tenant-a": demo["CACHEMESH_KEY_A"], "tenant-b": demo["CACHEMESH_KEY_B"]}
        token = (run_dir / "internal-token").read_text().strip()
        driven = Run(stack, keys, token)
        before = _lines_written(stack)
        _drive(driven)
        misses = sum(1 for a in driven.answers if a.response.served_by != pb.LAYER_SEMANTIC_CACHE)
        _settle(stack, misses)
        _await_access_lines(driven, before)
        after = _lines_written(stack)
        driven.log_marks = {name: (before[name], after[name]) for name in before}
        yield driven


def _lines_written(stack: Stack) -> dict[str, int]:
    """How many complete lines each service's log holds now."""
    return {spec.name: stack.log_path(spec).read_bytes().count(b"\n") for spec in SERVICES}


def _settle(stack: Stack, stores: int) -> None:
    """The answers' Stores run after the answers (the router does not wait for them). Waited
    for as the router counts them, once their replies came: semantic-cache counts a Store
    before it replies, so its count alone left the router's (asserted below) a reply behind on
    a loaded machine."""
    deadline = time.monotonic() + 30
    calls = "cachemesh_router_dependency_duration_seconds_count"
    while (
        _scrape(stack.metrics_addresses["router"]).value(calls, method="Store", code="OK") < stores
    ):
        assert time.monotonic() < deadline, "the Stores did not all arrive"
        time.sleep(0.1)


def _lines_since(stack: Stack, service: str, since: int) -> list[dict[str, Any]]:
    """``service``'s log from its line ``since``: complete lines only."""
    spec = next(s for s in SERVICES if s.name == service)
    whole = stack.log_path(spec).read_bytes().split(b"\n")[since:-1]
    return [json.loads(line) for line in whole if line]


def _await_access_lines(run: Run, before: dict[str, int]) -> None:
    """Waits until every call's lines are in the logs: the router's access line of each answer
    (by its trace id) and of its two refusals; the front's of its own refusal (by the request
    id its 401 carried), with the front's metric of it, and the front's line of the answer it
    passed on (by its trace id). A call's line is written when the call ends, which is not
    when its caller has its reply: the front writes its lines after the send (a caller that
    did not take the reply is a 499 there), and the router an answer's access line that went
    at its estimate once its bill comes (``billing.LateBill``). Taken right after the calls,
    the stretch of the logs the calls wrote could miss the front's lines (planted: a second's
    delay after the front's send: the calls' trace ids 11 of 12, the answer's trace not in the
    front's log). A line that never comes fails here, named."""
    deadline = time.monotonic() + 30
    answered = {a.response.trace_id for a in run.answers}
    while True:
        router = [
            line
            for line in _lines_since(run.stack, "router", before["router"])
            if line["logger"] == "cachemesh.access"
        ]
        missing = answered - {line.get("trace_id") for line in router}
        refusals = sum(1 for line in router if line["status"] != "OK")
        front = _lines_since(run.stack, "http-front", before["http-front"])
        front_refusal = any(
            line["logger"] == "cachemesh.access" and line["request_id"] == run.http_refused_id
            for line in front
        )
        front_answer = any(line.get("trace_id") == run.http_trace_id for line in front)
        counted = _scrape(run.stack.metrics_addresses["http-front"]).value(
            "cachemesh_http_front_requests_total", status="401"
        )
        if not missing and refusals >= 2 and front_refusal and front_answer and counted >= 1:
            return
        assert time.monotonic() < deadline, (
            f"lines missing: the router's access lines of answers {sorted(missing)}, of "
            f"refusals {refusals} of 2; the front's of its refusal {front_refusal} (its metric "
            f"{counted}), of its answer {front_answer}"
        )
        time.sleep(0.05)


def _misses(run: Run) -> list[Answered]:
    return [a for a in run.answers if a.response.served_by != pb.LAYER_SEMANTIC_CACHE]


def _prompt(usage: pb.Usage) -> int:
    return usage.input_tokens + usage.cache_creation_input_tokens + usage.cache_read_input_tokens


def test_the_run_covers_every_layer_and_both_tiers(run: Run) -> None:
    layers = Counter(a.response.served_by for a in run.answers)
    assert layers[pb.LAYER_MODEL] >= 4 and layers[pb.LAYER_PREFIX_CACHE] == 1
    hits = [a.response for a in run.answers if a.response.served_by == pb.LAYER_SEMANTIC_CACHE]
    assert sorted(h.semantic.exact for h in hits) == [False, True]
    assert {a.response.tier for a in run.answers} == {"small", "large"}
    assert all(a.response.trace_id for a in run.answers)


def test_router_counts_and_money_are_the_responses(run: Run) -> None:
    router = _scrape(run.stack.metrics_addresses["router"])
    requests: Counter[tuple[str, str, str, str]] = Counter()
    money: dict[tuple[str, str], list[int]] = {}
    for a in run.answers:
        r = a.response
        layer = LAYERS[r.served_by]
        requests[(a.tenant, r.model, r.tier, layer)] += 1
        sums = money.setdefault((a.tenant, layer), [0] * 7)
        u = r.usage
        for i, v in enumerate(
            (r.cost.cost_nanos, r.cost.baseline_nanos, r.cost.saved_nanos, u.input_tokens,
             u.cache_creation_input_tokens, u.cache_read_input_tokens, u.output_tokens)
        ):  # fmt: skip
            sums[i] += v
    for (tenant, model, tier, layer), count in requests.items():
        got = router.value(
            "cachemesh_router_requests_total",
            tenant=tenant,
            model=model,
            tier=tier,
            served_by=layer,
        )
        assert got == count, (tenant, model, tier, layer)
    assert router.value("cachemesh_router_requests_total") == len(run.answers)
    for (tenant, layer), sums in money.items():
        where = {"tenant": tenant, "served_by": layer}
        assert router.value("cachemesh_router_cost_nanos_total", **where) == sums[0]
        assert router.value("cachemesh_router_baseline_nanos_total", **where) == sums[1]
        assert router.value("cachemesh_router_saved_nanos", **where) == sums[2]
        for kind, total in zip(
            ("input", "cache_creation", "cache_read", "output"), sums[3:], strict=True
        ):
            assert router.value("cachemesh_router_tokens_total", type=kind, **where) == total
        count = sum(n for k, n in requests.items() if (k[0], k[3]) == (tenant, layer))
        by_layer = router.value("cachemesh_router_request_duration_seconds_count", served_by=layer)
        assert by_layer >= count
    refused = router.value("cachemesh_router_errors_total", tenant=NONE, code="UNAUTHENTICATED")
    assert refused == 1
    assert (
        router.value("cachemesh_router_errors_total", tenant="tenant-a", code="INVALID_ARGUMENT")
        == 1
    )
    assert router.value("cachemesh_router_errors_total") == 2
    assert router.value("cachemesh_router_degraded_total") == 0
    assert router.value("cachemesh_router_requests_in_flight") == 0
    # prefix-cache took every bill: the billing outbox's gauges are served, at 0
    assert {"cachemesh_router_outbox_pending", "cachemesh_router_outbox_oldest_age_seconds"} <= (
        router.names()
    )
    assert router.value("cachemesh_router_outbox_pending") == 0
    assert router.value("cachemesh_router_outbox_oldest_age_seconds") == 0


def test_decisions_and_genai_metrics_are_the_model_calls(run: Run) -> None:
    router = _scrape(run.stack.metrics_addresses["router"])
    misses = _misses(run)
    assert router.value("cachemesh_router_decisions_total") == len(misses)
    autos = [a.response for a in misses if a.response.HasField("routing")]
    assert len(autos) == 2  # the proof question and the streamed one
    for tier, count in Counter(r.tier for r in autos).items():
        routed = sum(
            router.value("cachemesh_router_decisions_total", tier=tier, reason=reason)
            for reason in ("threshold", "cost_aware")
        )
        assert routed == count, tier
    requested = router.value("cachemesh_router_decisions_total", reason="requested")
    assert requested == len(misses) - len(autos)
    assert router.value("cachemesh_router_ttft_seconds_count") == len(misses)
    for model in {a.response.model for a in misses}:
        mine = [a.response for a in misses if a.response.model == model]
        names = {"gen_ai_request_model": model, "gen_ai_operation_name": "chat"}
        usage = "gen_ai_client_token_usage_sum"
        assert router.value(usage, gen_ai_token_type="input", **names) == sum(
            _prompt(r.usage) for r in mine
        )
        assert router.value(usage, gen_ai_token_type="output", **names) == sum(
            r.usage.output_tokens for r in mine
        )
        duration = "gen_ai_client_operation_duration_seconds_count"
        assert router.value(duration, error_type="", **names) == len(mine)


def test_each_service_counts_what_the_router_asked_of_it(run: Run) -> None:
    scrapes = _scrapes(run.stack)
    router, semantic, prefix = scrapes["router"], scrapes["semantic-cache"], scrapes["prefix-cache"]
    models = [scrapes["model"], scrapes["model-2"]]
    misses = _misses(run)
    calls = "cachemesh_router_dependency_duration_seconds_count"
    # semantic-cache: a Lookup for every answered request, a Store for every miss
    assert router.value(calls, method="Lookup", code="OK") == len(run.answers)
    assert semantic.value("cachemesh_semantic_cache_lookups_total") == len(run.answers)
    for tenant in ("tenant-a", "tenant-b"):
        mine = [a.response for a in run.answers if a.tenant == tenant]
        hits = Counter(r.semantic.exact for r in mine if r.served_by == pb.LAYER_SEMANTIC_CACHE)
        looked = "cachemesh_semantic_cache_lookups_total"
        assert semantic.value(looked, tenant=tenant, result="exact") == hits[True]
        assert semantic.value(looked, tenant=tenant, result="paraphrase") == hits[False]
        assert semantic.value(looked, tenant=tenant, result="miss") == len(mine) - sum(
            hits.values()
        )
        stored = len([r for r in mine if r.served_by != pb.LAYER_SEMANTIC_CACHE])
        assert (
            semantic.value("cachemesh_semantic_cache_stores_total", tenant=tenant, outcome="stored")
            == stored
        )
        assert semantic.value("cachemesh_semantic_cache_entries", tenant=tenant) == stored
        assert semantic.value("cachemesh_semantic_cache_bytes", tenant=tenant) > 0
    assert router.value(calls, method="Store", code="OK") == len(misses)
    assert semantic.value("cachemesh_semantic_cache_embed_batch_size_sum") >= 1
    # prefix-cache: every Plan the router made, and one bill per miss (WARM and FINAL commits)
    assert router.value(calls, method="Plan", code="OK") == prefix.value(
        "cachemesh_prefix_cache_plans_total"
    )
    assert router.value(calls, method="Commit", code="OK") == 2 * len(misses)
    for model in {a.response.model for a in misses}:
        usages = [a.response.usage for a in misses if a.response.model == model]
        cost = sum(a.response.cost.cost_nanos for a in misses if a.response.model == model)
        tokens = "cachemesh_prefix_cache_tokens_total"
        assert prefix.value(tokens, model=model, kind="written") == sum(
            u.cache_creation_input_tokens for u in usages
        )
        assert prefix.value(tokens, model=model, kind="read") == sum(
            u.cache_read_input_tokens for u in usages
        )
        assert prefix.value(tokens, model=model, kind="uncached") == sum(
            u.input_tokens for u in usages
        )
        assert prefix.value(tokens, model=model, kind="output") == sum(
            u.output_tokens for u in usages
        )
        assert prefix.value("cachemesh_prefix_cache_cost_nanos_total", model=model) == cost
        assert prefix.value("cachemesh_prefix_cache_bills_total", model=model) == len(usages)

    # the replicas: what they were given and generated, their KV reuse (L3)
    def both(name: str, **labels: str) -> float:
        return sum(m.value(name, **labels) for m in models)

    assert router.value(calls, method="Generate", code="OK") == len(misses)
    assert both("cachemesh_model_generations_total", outcome="ok") == len(misses)
    assert both("cachemesh_model_prompt_tokens_total") == sum(
        _prompt(a.response.usage) for a in misses
    )
    assert both("cachemesh_model_kv_cached_tokens_total") == sum(
        a.response.usage.kv_cached_tokens for a in misses
    )
    assert both("cachemesh_model_kv_cached_tokens_total") > 0  # the agent's second turn
    assert both("cachemesh_model_output_tokens_total") == sum(
        a.response.usage.output_tokens for a in misses
    )
    assert both("cachemesh_model_in_flight") == 0
    # the HTTP front: its one call
    front = scrapes["http-front"]
    answered = front.value(
        "cachemesh_http_front_requests_total", api="anthropic", route="/v1/messages"
    )
    assert answered == 2  # and its refusal of a wrong key
    assert front.value("cachemesh_http_front_requests_total", status="200") == 1
    assert front.value("cachemesh_http_front_requests_total", status="401") == 1


def test_every_process_serves_its_own_metrics_with_process_figures(run: Run) -> None:
    scrapes = _scrapes(run.stack)
    assert set(scrapes) == {s.name for s in SERVICES}
    ports = {address for address in run.stack.metrics_addresses.values()}
    assert len(ports) == len(SERVICES)
    for name, scrape in scrapes.items():
        assert scrape.value("process_cpu_seconds_total") > 0, name
        assert scrape.value("process_resident_memory_bytes") > 0, name
        # every traced process counts the spans it drops unexported (none here: the
        # collector takes them all)
        for reason in ("queue_full", "export_failed", "shutdown"):
            dropped = [
                v
                for n, labels, v in scrape.samples
                if n == "cachemesh_spans_dropped_total" and labels == {"reason": reason}
            ]
            assert dropped == [0.0], (name, reason, dropped)


_QUERIED = re.compile(r"\b((?:cachemesh|gen_ai|process)_[a-z0-9_]+)")
_NOT_NAMES = re.compile(r"\b(?:by|without)\s*\([^)]*\)|\{[^}]*\}")  # label names, matchers
_SUFFIXES = ("_bucket", "_count", "_sum", "_total")


def _dashboard_metrics() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"]]
    exprs += [r["expr"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    return {name for expr in exprs for name in _QUERIED.findall(_NOT_NAMES.sub("", expr))}


def test_every_metric_the_dashboard_and_the_alerts_query_is_exposed(run: Run) -> None:
    scrapes = _scrapes(run.stack)
    exposed: set[str] = set()
    for scrape in scrapes.values():
        exposed |= scrape.names()
        for name, kind in scrape.families.items():  # declared, with no sample yet
            exposed |= {name, *(name + s for s in _SUFFIXES if kind in ("counter", "histogram"))}
    queried = _dashboard_metrics()
    assert len(queried) >= 30  # the regex reads the queries (a broken one would find none)
    missing = sorted(queried - exposed)
    assert not missing, f"the dashboard or an alert queries metrics no service exposes: {missing}"


# --- logs ---------------------------------------------------------------------------------


def _log_lines(stack: Stack) -> dict[str, list[dict[str, Any]]]:
    lines: dict[str, list[dict[str, Any]]] = {}
    for spec in SERVICES:
        path = stack.log_path(spec)
        lines[spec.name] = [json.loads(line) for line in path.read_text().splitlines() if line]
    return lines


# Lines no request writes, which may fall among the calls' lines: (service, logger, the
# message's start). The HTTP front's verdict on the Gateway changes when a /readyz probe asks
# it; semantic-cache's snapshots (none here: SEMANTIC_CACHE_SNAPSHOT_S=0) run on a timer
_BACKGROUND = (
    ("http-front", "cachemesh.http_front", "http-front: the Gateway at "),
    ("semantic-cache", "cachemesh.semantic_cache.persistence", ""),
)


def _background(service: str, line: dict[str, Any]) -> bool:
    return any(
        (service, line["logger"]) == (name, logger) and line["msg"].startswith(start)
        for name, logger, start in _BACKGROUND
    )


def test_every_line_is_json_and_every_line_inside_a_request_has_a_trace_id(run: Run) -> None:
    """Each line the calls wrote is tied to its call by the trace id it carries, not by when it
    was written: a timestamp within 2 ms of a call's window took a background line written
    beside a call (a loaded machine) for the call's. Every line of the stretch of each log the
    calls wrote (by position: no other test's) holds a trace id of one of the calls, the ones
    the access lines name (the router's, the front's own refusal), but a background writer's
    (named above)."""
    lines = _log_lines(run.stack)
    for service, found in lines.items():
        for line in found:
            assert {"ts", "level", "logger", "msg"} <= set(line), (service, line)
    stretch = {name: lines[name][a:b] for name, (a, b) in run.log_marks.items()}
    calls = {
        line.get("trace_id")
        for name in ("router", "http-front")
        for line in stretch[name]
        if line["logger"] == "cachemesh.access"
    }
    assert len(calls) == len(run.answers) + 3  # the router's two refusals, the front's one
    assert run.http_trace_id in calls and None not in calls and "" not in calls
    inside = 0
    for service, found in stretch.items():
        for line in found:
            if "trace_id" not in line and _background(service, line):
                continue
            assert line.get("trace_id") in calls, (service, line)  # a call's: tied by its id
            assert re.fullmatch(r"[0-9a-f]{16}", line.get("span_id", "")), (service, line)
            inside += 1
    assert inside >= 4 * len(run.answers)  # DEBUG: several services write in each request


def test_each_answer_has_one_access_line_and_its_trace_reaches_every_service(run: Run) -> None:
    lines = _log_lines(run.stack)
    by_trace: dict[str, set[str]] = {}
    for service, found in lines.items():
        for line in found:
            by_trace.setdefault(line.get("trace_id", ""), set()).add(service)
    access = [line for line in lines["router"] if line["logger"] == "cachemesh.access"]
    assert len(access) == len(run.answers) + 2  # and the two refusals
    for a in run.answers:
        r = a.response
        [line] = [x for x in access if x.get("trace_id") == r.trace_id]
        assert (line["tenant"], line["status"], line["model"], line["tier"]) == (
            a.tenant, "OK", r.model, r.tier,
        )  # fmt: skip
        assert line["served_by"] == LAYERS[r.served_by]
        assert (line["cost_nanos"], line["baseline_nanos"], line["saved_nanos"]) == (
            r.cost.cost_nanos, r.cost.baseline_nanos, r.cost.saved_nanos,
        )  # fmt: skip
        assert (line["input_tokens"], line["output_tokens"]) == (
            r.usage.input_tokens, r.usage.output_tokens,
        )  # fmt: skip
        assert line["duration_ms"] > 0
        reached = by_trace[r.trace_id]
        assert {"router", "semantic-cache"} <= reached, reached
        if r.served_by != pb.LAYER_SEMANTIC_CACHE:
            assert "prefix-cache" in reached and reached & {"model", "model-2"}, reached
    assert "http-front" in by_trace[run.http_trace_id]
    refused = {(x["tenant"], x["status"]) for x in access if x["status"] != "OK"}
    assert refused == {("", "UNAUTHENTICATED"), ("tenant-a", "INVALID_ARGUMENT")}
    assert all(x.get("trace_id") for x in access)
    # the front's own refusal: its line in the front's log, in the router's format, no key
    [front] = [x for x in lines["http-front"] if x["logger"] == "cachemesh.access"]
    assert set(access[0]) - set(front) <= {
        "model", "tier", "served_by", "replayed", "input_tokens", "cache_creation_input_tokens",
        "cache_read_input_tokens", "output_tokens", "cost_nanos", "baseline_nanos",
        "saved_nanos", "cost_estimated", "unanswered_cost_nanos", "routing_score",
        "routing_threshold", "routing_embedding_source", "routing_reason",
    }  # fmt: skip
    assert (front["tenant"], front["status"], front["http_status"], front["request_id"]) == (
        "", "UNAUTHENTICATED", 401, run.http_refused_id,
    )  # fmt: skip
    assert front["refused_by"] == "http-front" and front.get("trace_id")
    front_log = run.stack.log_path(next(s for s in SERVICES if s.name == "http-front"))
    text = front_log.read_text()
    for part in (run.http_wrong_key, run.http_wrong_key[:12], run.http_wrong_key[-10:]):
        assert part not in text


def test_no_question_key_or_token_in_any_log_or_metric(run: Run) -> None:
    texts = {p.name: p.read_text() for p in (run.stack.run_dir / "logs").iterdir()}
    texts |= {f"metrics of {n}": s.text for n, s in _scrapes(run.stack).items()}
    secrets = [*run.keys.values(), run.internal_token]
    for where, text in texts.items():
        for secret in secrets:
            for fragment in (secret, secret[:12], secret[-10:]):
                assert fragment not in text, f"a secret ({len(fragment)} characters) in {where}"
        for question in run.questions:
            assert question not in text, f"the question {question!r} in {where} (DEBUG)"
