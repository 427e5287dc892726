"""The compose Prometheus's alert rules (services/observability/prometheus/alerts.yml).

promtool is not at hand, so the rules are read here: the file loads as Prometheus's rule-file
format, every rule has what an operator needs (a ``for``, a severity, a summary and a
description pointing at the README's "Alerts" section, which lists it), and every metric and
label an expression names is one the services define: each service's metrics are built on a
registry of their own, as its ``serve()`` builds them, and their names and label names
collected (labelled families included, which a scrape shows only once a child exists).
tests/integration/test_metrics_logs.py checks the names against a running stack's scrapes.
"""

from __future__ import annotations

import asyncio
import functools
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import semantic_cache_pb2
from services.common.env import Env
from services.common.errors import Code
from services.common.metrics import LoopMetrics, TenantLabels
from services.common.model_overrides import model_table_from_env
from services.common.otlp_wire import ExportHealth
from services.common.telemetry import SpanDrops, TracingProvider
from services.http_front.metrics import HttpFrontMetrics
from services.model.metrics import ModelMetrics
from services.prefix_cache.metrics import PrefixCacheMetrics
from services.router.calls import Calls
from services.router.dependencies import CLIENT_DEADLINE, CallFailed, Dependencies
from services.router.metrics import RouterMetrics
from services.router.outbox import Backlog
from services.router.settings import RouterSettings
from services.semantic_cache.metrics import SemanticCacheMetrics, StoreCollector
from services.semantic_cache.records import CheckResult
from services.semantic_cache.stats import StoreStats

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "services" / "observability" / "prometheus"
RULES = PROMETHEUS_DIR / "alerts.yml"
README = ROOT / "README.md"

# what Prometheus adds to every series it scrapes, and its own series per target
TARGET_LABELS = frozenset({"job", "instance"})
SYNTHETIC: dict[str, frozenset[str]] = {"up": frozenset()}
GRPC_CODES = frozenset(code.name for code in Code)
# labels whose values are gRPC status names, on these metrics
STATUS_LABELS = {
    ("cachemesh_router_errors_total", "code"),
    ("cachemesh_router_degraded_total", "reason"),
    ("cachemesh_router_dependency_duration_seconds_bucket", "code"),
    ("cachemesh_router_dependency_duration_seconds_count", "code"),
}
# the values of those that are no gRPC status: a degraded call the client's deadline cut short
NOT_STATUSES = {("cachemesh_router_degraded_total", "reason"): frozenset({CLIENT_DEADLINE})}
SEVERITIES = {"critical", "warning"}
RULE_KEYS = {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}


# --- what the services define ---------------------------------------------------------------


class _Recording(CollectorRegistry):
    """A registry that keeps the collectors registered on it."""

    def __init__(self) -> None:
        super().__init__()
        self.collectors: list[Collector] = []

    def register(self, collector: Collector) -> None:
        self.collectors.append(collector)
        super().register(collector)


def _registries() -> Iterator[_Recording]:
    """One registry per service, holding what its ``serve()`` registers (``new_registry``'s
    process and platform collectors, its metrics, semantic-cache's store collector)."""

    def fresh() -> _Recording:
        registry = _Recording()
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        # every service's: its spans dropped unexported (with an OTLP exporter, the default)
        traced = TracingProvider()
        traced.export_health = ExportHealth("http://127.0.0.1:4317")
        registry.register(SpanDrops(traced))
        return registry

    router = fresh()
    # serve() registers the billing outbox's gauges too (read at each scrape)
    RouterMetrics(router, TenantLabels(1)).outbox_backlog(lambda: Backlog(0, 0.0))
    yield router
    semantic = fresh()
    SemanticCacheMetrics(semantic, TenantLabels(1))
    # one tenant held, so the per-tenant gauges show their labels
    semantic.register(StoreCollector(StoreStats(entries={"t": 1}, bytes={"t": 1}), 1))
    yield semantic
    prefix = fresh()
    PrefixCacheMetrics(prefix)
    yield prefix
    model = fresh()
    ModelMetrics(model, ["sim-small"], time.perf_counter)
    yield model
    front = fresh()
    HttpFrontMetrics(front, time.perf_counter)
    yield front


def defined_metrics() -> dict[str, frozenset[str]]:
    """Every series name the services expose -> its label names (Prometheus's target labels
    not included)."""
    found: dict[str, set[str]] = {}
    for registry in _registries():
        for collector in registry.collectors:
            if isinstance(collector, LoopMetrics):
                for family in collector._families:
                    labels = set(family.labels)
                    if family.kind == "counter":
                        found.setdefault(family.name + "_total", set()).update(labels)
                    elif family.kind == "histogram":
                        found.setdefault(family.name + "_bucket", set()).update(labels | {"le"})
                        found.setdefault(family.name + "_count", set()).update(labels)
                        found.setdefault(family.name + "_sum", set()).update(labels)
                    else:
                        found.setdefault(family.name, set()).update(labels)
                continue
            for metric in collector.collect():
                for sample in metric.samples:
                    found.setdefault(sample.name, set()).update(sample.labels)
    return {name: frozenset(labels) for name, labels in found.items()} | SYNTHETIC


DEFINED = defined_metrics()


# --- reading PromQL -------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<range>\[[0-9a-z:]+\])
  | (?P<number>[0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|==|!=|>=|<=|[-+*/%^<>=(){},])
    """,
    re.VERBOSE,
)
AGGREGATIONS = frozenset(
    {"sum", "min", "max", "avg", "count", "group", "stddev", "stdvar", "topk", "bottomk"}
    | {"quantile", "count_values"}
)
FUNCTIONS = AGGREGATIONS | {
    "rate", "irate", "increase", "delta", "idelta", "deriv", "scalar", "vector", "abs",
    "absent", "absent_over_time", "avg_over_time", "min_over_time", "max_over_time",
    "sum_over_time", "count_over_time", "last_over_time", "quantile_over_time", "changes",
    "resets", "clamp", "clamp_min", "clamp_max", "histogram_quantile", "time", "timestamp",
    "label_replace", "label_join", "round", "ceil", "floor", "sqrt", "ln", "log2", "log10", "exp",
}  # fmt: skip
MODIFIERS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset"})


@dataclass
class Selector:
    name: str
    at: int  # its token's index
    matchers: list[tuple[str, str, str]] = field(default_factory=list)  # label, op, value


@dataclass
class Query:
    selectors: list[Selector]
    groupings: list[tuple[str, list[str], list[Selector]]]  # modifier, labels, in scope
    aggregates: bool  # an aggregation is applied somewhere
    problems: list[str]


def _tokens(expr: str) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    at = 0
    while at < len(expr):
        match = _TOKEN.match(expr, at)
        if match is None:
            raise ValueError(f"cannot read {expr[at : at + 20]!r}")
        at = match.end()
        if match.lastgroup != "space":
            found.append((str(match.lastgroup), match.group()))
    return found


def _closing(tokens: list[tuple[str, str]]) -> dict[int, int]:
    """Each ``(`` / ``{`` index -> the index of its closing token."""
    pairs: dict[int, int] = {}
    stack: list[int] = []
    for i, (_, text) in enumerate(tokens):
        if text in "({":
            stack.append(i)
        elif text in ")}":
            if not stack or tokens[stack[-1]][1] != {")": "(", "}": "{"}[text]:
                raise ValueError(f"unbalanced {text!r}")
            pairs[stack.pop()] = i
    if stack:
        raise ValueError("unclosed ( or {")
    return pairs


def _label_list(tokens: list[tuple[str, str]], start: int, end: int) -> list[str]:
    """The label names of ``(a, b)`` between ``start`` and its closing ``end``."""
    inner = tokens[start + 1 : end]
    names = [text for kind, text in inner if kind == "ident"]
    assert all(text == "," for kind, text in inner if kind != "ident"), inner
    return names


def read_query(expr: str) -> Query:
    """The selectors (metric names and matchers) and grouping labels of a PromQL expression,
    and what cannot be checked in it."""
    problems: list[str] = []
    try:
        tokens = _tokens(expr)
        closing = _closing(tokens)
    except ValueError as exc:
        return Query([], [], False, [f"unreadable: {exc}"])
    selectors: list[Selector] = []
    pending: list[tuple[str, list[str], int, int]] = []  # modifier, labels, scope start, end
    aggregates = False
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if kind == "op" and text == "{":
            problems.append("a selector without a metric name")
            i = closing[i] + 1
            continue
        if kind != "ident":
            i += 1
            continue
        if text in MODIFIERS:
            if following != "(":
                problems.append(f"{text} without a label list")
                i += 1
                continue
            end = closing[i + 1]
            labels = _label_list(tokens, i + 1, end)
            if text in ("by", "without"):
                # only the prefix form: agg by (labels) (argument)
                if i == 0 or tokens[i - 1][1] not in AGGREGATIONS or end + 1 >= len(tokens):
                    problems.append(f"write `<aggregation> {text} (...) (...)`")
                else:
                    pending.append((text, labels, end + 1, closing[end + 1]))
            else:
                pending.append((text, labels, 0, len(tokens)))
            i = end + 1
            continue
        if text in KEYWORDS:
            i += 1
            continue
        if following == "(" or (text in AGGREGATIONS and following in ("by", "without")):
            if text not in FUNCTIONS:
                problems.append(f"unknown function {text}")
            aggregates = aggregates or text in AGGREGATIONS
            i += 1
            continue
        selector = Selector(text, i)
        selectors.append(selector)
        i += 1
        if following == "{":
            end = closing[i]
            inner = tokens[i + 1 : end]
            while inner:
                part, inner = inner[:3], inner[3:]  # label op "value", then "," or the end
                label, op, value = (part + [("", "")] * 3)[:3]
                if label[0] != "ident" or op[1] not in ("=", "!=", "=~", "!~"):
                    problems.append(f"unreadable matcher in {text}: {part}")
                    break
                if value[0] != "string" or (inner and inner.pop(0)[1] != ","):
                    problems.append(f"unreadable matcher in {text}: {part}")
                    break
                selector.matchers.append((label[1], op[1], value[1][1:-1]))
            i = end + 1
    groupings = [
        (modifier, labels, [s for s in selectors if start <= s.at <= end])
        for modifier, labels, start, end in pending
    ]
    return Query(selectors, groupings, aggregates, problems)


def unknown_names(expr: str, defined: dict[str, frozenset[str]] = DEFINED) -> list[str]:
    """What ``expr`` names that no service defines: metrics, labels, label values of closed
    sets (gRPC status names, scrape jobs); empty when all of it exists."""
    query = read_query(expr)
    problems = list(query.problems)
    if not query.selectors:
        problems.append("no metric read")
    jobs = _scrape_jobs()
    for selector in query.selectors:
        if selector.name not in defined:
            problems.append(f"no service exposes {selector.name}")
            continue
        labels = defined[selector.name] | TARGET_LABELS
        for label, op, value in selector.matchers:
            if label not in labels:
                problems.append(f"{selector.name} has no label {label}")
            values = value.split("|") if op in ("=~", "!~") else [value]
            if (selector.name, label) in STATUS_LABELS:
                known = GRPC_CODES | NOT_STATUSES.get((selector.name, label), frozenset())
                problems += [f"{v} is no gRPC status" for v in values if v not in known]
            if label == "job":
                problems += [f"{v} is no scrape job" for v in values if v not in jobs]
            elif (selector.name, label) not in STATUS_LABELS and op in ("=", "!="):
                written = written_values().get((selector.name, label))
                if written is None:
                    problems.append(f"{selector.name}{{{label}}}: no values known to check")
                elif value not in written:
                    problems.append(f'no service writes {label}="{value}" ({sorted(written)})')
    for modifier, grouped, scope in query.groupings:
        for selector in scope:
            have = defined.get(selector.name, frozenset()) | TARGET_LABELS
            problems += [
                f"{modifier} ({label}): {selector.name} has no label {label}"
                for label in grouped
                if label not in have
            ]
    return problems


def result_labels(expr: str) -> frozenset[str]:
    """The labels an alert of ``expr`` can carry (for its annotations' ``$labels``): the
    ``by`` labels when it aggregates, else its series' own."""
    query = read_query(expr)
    if query.aggregates:
        return frozenset(
            label for modifier, labels, _ in query.groupings if modifier == "by" for label in labels
        )
    return (
        frozenset(label for s in query.selectors for label in DEFINED.get(s.name, frozenset()))
        | TARGET_LABELS
    )


class _Failing:
    """A dependency whose every call fails UNAVAILABLE."""

    def __getattr__(self, method: str) -> Callable[..., Awaitable[None]]:
        async def call(*args: object) -> None:
            raise CallFailed(Code.UNAVAILABLE, "down")

        return call


@functools.cache
def written_values() -> dict[tuple[str, str], frozenset[str]]:
    """The values the code writes to the labels the rules match on exactly (closed sets that
    are not gRPC status names): a semantic-cache miss's ``result``, and the ``dependency`` the
    router counts when semantic-cache (a Store) and prefix-cache (a Plan) fail."""
    registry = _Recording()
    semantic = SemanticCacheMetrics(registry, TenantLabels(1))  # its own series at 0 too
    semantic.looked_up("t", CheckResult(None))
    semantic.stored("t", True)
    semantic.stored("t", False)
    router = _Recording()
    router_metrics = RouterMetrics(router, TenantLabels(1))
    for routers_deadline in (False, True):
        router_metrics.failed("t", "DEADLINE_EXCEEDED", 1.0, routers_deadline=routers_deadline)

    def values(registry: _Recording, name: str, label: str) -> frozenset[str]:
        return frozenset(
            sample.labels[label]
            for metric in registry.collect()
            for sample in metric.samples
            if sample.name == name
        )

    env = Env(
        {
            "MODEL_REPLICAS": "sim-small=127.0.0.1:1,sim-large=127.0.0.1:1",
            "CACHEMESH_API_KEYS_FILE": "/dev/null",
            "CACHEMESH_INTERNAL_TOKEN": "t" * 32,
        }
    )
    failing = cast(Any, _Failing())
    dependencies = Dependencies(semantic=failing, prefix=failing, model=failing, models={})
    counted: set[tuple[str, str]] = set()
    calls = Calls(
        dependencies,
        RouterSettings.from_env(env, model_table_from_env(env)),
        lambda dependency, reason: counted.add((dependency, reason)),
    )
    request = pb.CompleteRequest(
        model="sim-small",
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="Hello?")])],
    )

    async def fail_both() -> None:
        await calls.store("t", request, semantic_cache_pb2.CachedAnswer())
        await calls.plan("t", "sim-small", request, ["r"])

    asyncio.run(fail_both())
    assert {reason for _, reason in counted} == {"UNAVAILABLE"}
    semantic_values = {
        (name, label): values(registry, name, label)
        for name, label in (
            ("cachemesh_semantic_cache_lookups_total", "result"),
            ("cachemesh_semantic_cache_stores_total", "outcome"),
            ("cachemesh_semantic_cache_wal_tail_cuts_total", "kind"),
            ("cachemesh_semantic_cache_embed_shed_total", "call"),
        )
    }
    return semantic_values | {
        ("cachemesh_router_degraded_total", "dependency"): frozenset(d for d, _ in counted),
        ("cachemesh_router_errors_total", "deadline"): values(
            router, "cachemesh_router_errors_total", "deadline"
        ),
    }


def _scrape_jobs() -> set[str]:
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    return {job["job_name"] for job in config["scrape_configs"]}


# --- the rules ------------------------------------------------------------------------------


def _rules() -> list[dict[str, Any]]:
    loaded = yaml.safe_load(RULES.read_text())
    return [rule for group in loaded["groups"] for rule in group["rules"]]


def _ids(rule: dict[str, Any]) -> str:
    return str(rule.get("alert", "?"))


def test_the_definitions_are_read_with_their_labels() -> None:
    # a family with labels and no child yet is read too (a scrape would not show its labels)
    assert DEFINED["cachemesh_router_replica_ejections_total"] == {"model"}
    assert DEFINED["cachemesh_router_outbox_refused_total"] == frozenset()
    assert DEFINED["cachemesh_router_request_duration_seconds_count"] == {"served_by"}
    assert DEFINED["cachemesh_semantic_cache_entries"] == {"tenant"}
    assert "cachemesh_semantic_cache_evictions_total" in DEFINED
    assert "process_cpu_seconds_total" in DEFINED
    assert DEFINED["cachemesh_http_front_requests_total"] == {"api", "route", "status"}
    assert DEFINED["cachemesh_spans_dropped_total"] == {"reason"}


def test_the_values_matched_on_are_read_from_the_code() -> None:
    assert written_values() == {
        ("cachemesh_semantic_cache_lookups_total", "result"): {"miss"},
        ("cachemesh_semantic_cache_stores_total", "outcome"): {"stored", "skipped"},
        ("cachemesh_semantic_cache_wal_tail_cuts_total", "kind"): {"torn", "damaged"},
        ("cachemesh_semantic_cache_embed_shed_total", "call"): {"lookup", "store"},
        ("cachemesh_router_degraded_total", "dependency"): {"semantic-cache", "prefix-cache"},
        ("cachemesh_router_errors_total", "deadline"): {"client", "router"},
    }


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ("rate(cachemesh_router_error_total[5m]) > 0", "no service exposes"),
        ('cachemesh_router_errors_total{cod="UNAVAILABLE"}', "has no label cod"),
        ('cachemesh_router_errors_total{code=~"UNAVAILABLE|BROKEN"}', "BROKEN is no gRPC"),
        ("sum by (tenant) (rate(cachemesh_router_degraded_total[5m]))", "has no label tenant"),
        ("sum(rate(cachemesh_router_degraded_total[5m])) by (dependency)", "write `<agg"),
        ("rat(cachemesh_router_degraded_total[5m])", "unknown function rat"),
        ('up{job="routr"} == 0', "routr is no scrape job"),
        ('cachemesh_router_degraded_total{dependency="semantic_cache"}', "no service writes"),
        ('cachemesh_router_requests_total{tier="small"}', "no values known"),
        ("sum(rate(cachemesh_router_errors_total[5m])", "unreadable"),
        ("vector(0)", "no metric read"),
    ],
)
def test_an_unknown_name_or_label_is_caught(expr: str, problem: str) -> None:
    found = unknown_names(expr)
    assert any(problem in p for p in found), found


def test_a_good_expression_passes() -> None:
    expr = (
        'sum by (tenant) (rate(cachemesh_router_errors_total{code="RESOURCE_EXHAUSTED",'
        'job="router"}[15m])) / scalar(sum(rate(cachemesh_router_requests_total[15m]))) > 0.5'
    )
    assert unknown_names(expr) == []
    assert result_labels(expr) == {"tenant"}


def test_the_readmes_suggested_outbox_rule_names_defined_metrics() -> None:
    """Not a rule yet (its bound is the operators'), but one written from the README must
    pass ``test_every_metric_and_label_a_rule_names_is_defined``: the outbox's gauges are
    registered by ``RouterMetrics.outbox_backlog``, which ``_registries`` calls as
    ``serve()`` does."""
    section = README.read_text().split("\n## Alerts\n", 1)[1].split("\n## ", 1)[0]
    suggested = re.findall(r"`(cachemesh_router_outbox_\w+ > \d+)`", section)
    assert suggested, "the README's alerts section suggests no outbox rule"
    for expr in suggested:
        assert unknown_names(expr) == [], expr


def test_the_file_is_a_prometheus_rule_file_with_one_group_of_unique_alerts() -> None:
    loaded = yaml.safe_load(RULES.read_text())
    assert set(loaded) == {"groups"}
    names = [group["name"] for group in loaded["groups"]]
    assert len(names) == len(set(names)) >= 1
    for group in loaded["groups"]:
        assert set(group) <= {"name", "interval", "rules"} and group["rules"], group["name"]
    alerts = [_ids(rule) for rule in _rules()]
    assert len(alerts) == len(set(alerts)) >= 6
    assert all(re.fullmatch(r"Cachemesh[A-Z][A-Za-z]+", name) for name in alerts), alerts


@pytest.mark.parametrize("rule", _rules(), ids=_ids)
def test_every_rule_has_a_for_a_severity_a_summary_and_what_to_check(
    rule: dict[str, Any],
) -> None:
    assert set(rule) <= RULE_KEYS, set(rule) - RULE_KEYS
    assert isinstance(rule["expr"], str) and rule["expr"].strip()
    assert re.fullmatch(r"[1-9][0-9]*[smh]", str(rule["for"])), rule["for"]
    assert rule["labels"]["severity"] in SEVERITIES
    notes = rule["annotations"]
    assert set(notes) >= {"summary", "description"}
    assert "README.md#alerts" in notes["description"]
    assert len(notes["description"]) > len(notes["summary"]) > 10


@pytest.mark.parametrize("rule", _rules(), ids=_ids)
def test_every_metric_and_label_a_rule_names_is_defined(rule: dict[str, Any]) -> None:
    assert unknown_names(rule["expr"]) == []


@pytest.mark.parametrize("rule", _rules(), ids=_ids)
def test_annotations_name_only_labels_the_alert_carries(rule: dict[str, Any]) -> None:
    carried = result_labels(rule["expr"])
    for text in rule["annotations"].values():
        for template in re.findall(r"\{\{(.*?)\}\}", text):
            used = re.findall(r"\$labels\.([a-z_]+)", template)
            assert set(used) <= carried, f"{template}: the alert carries only {sorted(carried)}"
            simple = r"\s*\$(value|labels\.[a-z_]+)(\s*\|\s*\w+)?\s*"  # $x or $x | function
            assert re.fullmatch(simple, template), template


def test_the_readme_lists_every_alert_in_its_alerts_section() -> None:
    text = README.read_text()
    assert "\n## Alerts\n" in text  # README.md#alerts
    section = text.split("\n## Alerts\n", 1)[1].split("\n## ", 1)[0]
    rows = {m for m in re.findall(r"^\| `(Cachemesh\w+)` \|", section, flags=re.MULTILINE)}
    assert rows == {_ids(rule) for rule in _rules()}
