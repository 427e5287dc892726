"""Which case runs on which stack, in which order.

On the bench's own stacks (``own_stacks``): (d) on a stack with the simulator's timings from
``.env``; then two stacks whose simulated model answers at once (``SIM_TIME_SCALE=0``), one
exporting no traces and one exporting every span to a real OTLP receiver. (a) exact hits and
(c) agent misses run on both, level by level, alternating which goes first (off/on, on/off,
off/on) so drift in the machine's other load falls on both; (b) and (c2) run on the untraced
one. Against a running stack (``against_target``) only (a), (b) and (d) run: the others need a
stack the bench configures itself.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.bench import cases
from services.bench.measure import measure
from services.bench.sink_process import SinkProcess
from services.bench.stacks import SIM_ZERO, TRACES_OFF, BenchStack, Target, bench_stack, traces_to

EXACT, SEMANTIC, AGENT, UNRELATED, MIXED = (
    "a_exact_hit", "b_semantic_hit", "c_miss_agent_sim_zero", "c2_miss_unrelated_sim_zero",
    "d_mixed",
)  # fmt: skip
OFF, ON = "zero", "zero-traced"


@dataclass(frozen=True)
class Plan:
    root: Path
    data_dir: Path
    run: str  # namespace prefix of this run
    levels: tuple[int, ...]
    requests: int  # per measured point
    mixed_requests: int
    pairs: list[tuple[str, str]]  # (b): stored side, asked side


@dataclass
class Outcome:
    cases: dict[str, Any] = field(default_factory=dict)
    tracing: dict[str, Any] = field(default_factory=dict)
    stacks: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> its overrides
    secrets: list[str] = field(default_factory=list)
    mixed_params: dict[str, object] = field(default_factory=dict)


def _exact(plan: Plan, target: Target, level: int) -> dict[str, Any]:
    namespace = f"{plan.run}-exact-{level}-{target.name}"
    warm, items = cases.exact_hits(plan.data_dir, namespace, plan.requests)
    return measure(target, warm, items, level, f"(a) exact x{level} {target.name}")


def _semantic(plan: Plan, target: Target, level: int) -> dict[str, Any]:
    warm, items = cases.semantic_hits(plan.pairs, f"{plan.run}-semantic-{level}", plan.requests)
    return measure(target, warm, items, level, f"(b) semantic x{level} {target.name}")


def _agent(plan: Plan, target: Target, level: int) -> dict[str, Any]:
    namespace = f"{plan.run}-agent-{level}-{target.name}"
    items = cases.agent_misses(plan.data_dir, namespace, plan.requests, seed=level)
    return measure(target, [], items, level, f"(c) agent miss x{level} {target.name}")


def _unrelated(plan: Plan, target: Target, level: int) -> dict[str, Any]:
    items = cases.misses(plan.data_dir, f"{plan.run}-unrelated-{level}", plan.requests, level)
    return measure(target, [], items, level, f"(c2) unrelated miss x{level} {target.name}")


def _mixed(plan: Plan, target: Target, out: Outcome) -> None:
    items, params, labels = cases.mixed(plan.data_dir, f"{plan.run}-mixed", plan.mixed_requests, 7)
    out.mixed_params = params
    out.cases[MIXED] = measure(target, [], items, 8, f"(d) mixed x8 {target.name}", labels)


def _keep(out: Outcome, stack: BenchStack) -> Target:
    out.stacks[stack.name] = stack.overrides
    out.secrets += stack.secrets
    return stack.target


def own_stacks(plan: Plan) -> Outcome:
    out = Outcome()
    with bench_stack(plan.root, "sim", TRACES_OFF) as sim:
        _mixed(plan, _keep(out, sim), out)
    sink = SinkProcess()
    endpoint = sink.start()
    spans: dict[str, int] = {}
    try:
        with ExitStack() as running:
            off = _keep(
                out, running.enter_context(bench_stack(plan.root, OFF, {**SIM_ZERO, **TRACES_OFF}))
            )
            on = _keep(out, running.enter_context(
                bench_stack(plan.root, ON, {**SIM_ZERO, **traces_to(endpoint)})))  # fmt: skip
            rows: dict[str, dict[str, list[dict[str, Any]]]] = {
                EXACT: {OFF: [], ON: []},
                AGENT: {OFF: [], ON: []},
            }
            for i, level in enumerate(plan.levels):
                order = (off, on) if i % 2 == 0 else (on, off)
                for target in order:
                    rows[EXACT][target.name].append(_exact(plan, target, level))
                for target in order:
                    rows[AGENT][target.name].append(_agent(plan, target, level))
            out.cases[EXACT], out.cases[AGENT] = rows[EXACT][OFF], rows[AGENT][OFF]
            out.cases[SEMANTIC] = [_semantic(plan, off, level) for level in plan.levels]
            out.cases[UNRELATED] = [_unrelated(plan, off, level) for level in plan.levels]
    finally:
        spans = sink.stop()  # after the traced stack stopped: its exporters have flushed
    traced = rows[EXACT][ON] + rows[AGENT][ON]
    out.tracing = {
        "off_stack": OFF, "on_stack": ON, "exporter": "otlp (gRPC)",
        "order": "per level, alternately off then on and on then off",
        "receiver": {
            "spans_received": sum(spans.values()), "by_service": spans,
            "requests_sent": sum(r["requests"] + r["warmup_requests"] for r in traced),
        },
        "on": {EXACT: rows[EXACT][ON], AGENT: rows[AGENT][ON]},
    }  # fmt: skip
    return out


def against_target(plan: Plan, target: Target) -> Outcome:
    out = Outcome()
    out.cases[EXACT] = [_exact(plan, target, level) for level in plan.levels]
    out.cases[SEMANTIC] = [_semantic(plan, target, level) for level in plan.levels]
    _mixed(plan, target, out)
    skipped = f"--target {target.address}: needs a stack the bench starts itself"
    out.tracing = {"skipped": skipped}
    out.cases[AGENT] = out.cases[UNRELATED] = {"skipped": skipped}
    return out
