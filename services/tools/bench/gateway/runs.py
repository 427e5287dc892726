"""Which case runs on which stack, in which order.

On the bench's own stacks (``own_stacks``): (d) on a stack with the simulator's timings from
``.env``; then two stacks whose simulated model answers at once (``SIM_TIME_SCALE=0``), one
exporting no traces and one exporting every span to a real OTLP receiver. (a) exact hits and
(c) agent misses run on both ``REPEATS`` times per level, in the order A B B A (A =
off at 1 and 32 in flight, on at 8), and each stack's runs are pooled: a drift of the
machine's other load (other people's benchmarks) then falls on both sides alike. (b) and
(c2) run on the untraced stack. Exact hits are fast, so (a) sends ``HIT_FACTOR`` times the
requests of a miss case; (b) asks each of its paraphrases once, ``requests`` a
level. The echo references of (a) and (c) (the two-hop echo, the agent miss
chain) run at each level around that level's runs of their case, half before and half after,
so that a case and its reference see the machine at the same speed. Against a running stack
(``against_target``) only (a), (b) and (d) run: the others need a stack the bench configures
itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.tools.bench.gateway import cases
from services.tools.bench.gateway.chain import Chain
from services.tools.bench.gateway.echo import EchoRun, RunningChain, echo_row, reference
from services.tools.bench.gateway.measure import Run, combine, measure, run_point
from services.tools.bench.gateway.sink_process import SinkProcess
from services.tools.bench.gateway.stacks import (
    SIM_ZERO,
    TRACES_OFF,
    BenchStack,
    Target,
    bench_stack,
    traces_to,
)

EXACT, SEMANTIC, AGENT, UNRELATED, MIXED = (
    "a_exact_hit", "b_semantic_hit", "c_miss_agent_sim_zero", "c2_miss_unrelated_sim_zero",
    "d_mixed",
)  # fmt: skip
OFF, ON = "zero", "zero-traced"
HIT_FACTOR = 3
REPEATS = 2  # runs of (a) and (c) per stack and level, interleaved A B B A


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
    # case -> its echo reference, measured around the case (``echo.reference``)
    references: dict[str, dict[str, Any]] = field(default_factory=dict)


def _exact(plan: Plan, target: Target, level: int, repeat: int = 0) -> Run:
    namespace = f"{plan.run}-exact-{level}-{target.name}-{repeat}"
    warm, items = cases.exact_hits(plan.data_dir, namespace, plan.requests * HIT_FACTOR)
    return run_point(target, warm, items, level, f"(a) exact x{level} {target.name}")


def _semantic(plan: Plan, target: Target, level: int) -> dict[str, Any]:
    """Each level asks pairs of its own, each once (``cases.paraphrase_pairs``)."""
    namespace = f"{plan.run}-semantic-{level}"
    share = len(plan.pairs) // len(plan.levels)
    start = plan.levels.index(level) * share
    warm, items = cases.semantic_hits(plan.pairs[start : start + share], namespace)
    return measure(target, warm, items, level, f"(b) semantic x{level} {target.name}")


def _agent(plan: Plan, target: Target, level: int, repeat: int) -> Run:
    """The same requests on both stacks for the same repeat (new ones for the next)."""
    namespace = f"{plan.run}-agent-{level}-{target.name}-{repeat}"
    items = cases.agent_misses(
        plan.data_dir, namespace, plan.requests, seed=cases.agent_seed(level, repeat)
    )
    return run_point(target, [], items, level, f"(c) agent miss x{level} {target.name}")


def echo_requests(plan: Plan, case: str) -> int:
    """The calls of a case's echo reference at one level (as many as a run of the case)."""
    return plan.requests * HIT_FACTOR if case == EXACT else plan.requests


def _interleaved(
    plan: Plan, first: Target, second: Target, level: int, echoes: Mapping[str, RunningChain]
) -> tuple[dict[str, dict[str, dict[str, Any]]], dict[str, dict[str, Any]]]:
    """(case -> stack -> its pooled row, case -> its echo's row): (a) then (c), each run
    A B B A between two halves of its echo reference's calls."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    echo_rows: dict[str, dict[str, Any]] = {}
    for case, one in ((EXACT, _exact), (AGENT, _agent)):
        calls = echo_requests(plan, case)
        echo: list[EchoRun] = [echoes[case].run(level, calls // 2)]
        runs: dict[str, list[Run]] = {first.name: [], second.name: []}
        for repeat in range(REPEATS):
            pair = (first, second) if repeat % 2 == 0 else (second, first)
            for target in pair:
                runs[target.name].append(one(plan, target, level, repeat))
        echo.append(echoes[case].run(level, calls - calls // 2))
        out[case] = {t.name: combine(t, level, runs[t.name]) for t in (first, second)}
        echo_rows[case] = echo_row(echo)
    return out, echo_rows


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


def own_stacks(plan: Plan, echoes: Mapping[str, Chain]) -> Outcome:
    """``echoes``: the reference chain of (a) (``EXACT``) and of (c) (``AGENT``)."""
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
            running_echoes = {
                case: running.enter_context(RunningChain(chain)) for case, chain in echoes.items()
            }
            rows: dict[str, dict[str, list[dict[str, Any]]]] = {
                EXACT: {OFF: [], ON: []},
                AGENT: {OFF: [], ON: []},
            }
            echo_levels: dict[str, list[dict[str, Any]]] = {EXACT: [], AGENT: []}
            for i, level in enumerate(plan.levels):
                first, second = (off, on) if i % 2 == 0 else (on, off)
                by_case, echo_rows = _interleaved(plan, first, second, level, running_echoes)
                for case, by_stack in by_case.items():
                    echo_levels[case].append(echo_rows[case])
                    for name, row in by_stack.items():
                        rows[case][name].append(row)
            out.cases[EXACT], out.cases[AGENT] = rows[EXACT][OFF], rows[AGENT][OFF]
            out.cases[SEMANTIC] = [_semantic(plan, off, level) for level in plan.levels]
            out.cases[UNRELATED] = [_unrelated(plan, off, level) for level in plan.levels]
    finally:
        spans = sink.stop()  # after the traced stack stopped: its exporters have flushed
    around = "around its case at each level: half before, half after its runs"
    out.references = {
        case: reference(chain, echo_requests(plan, case), around, echo_levels[case])
        for case, chain in echoes.items()
    }
    traced = rows[EXACT][ON] + rows[AGENT][ON]
    out.tracing = {
        "off_stack": OFF, "on_stack": ON, "exporter": "otlp (gRPC)",
        "order": f"{REPEATS} runs a stack per level and case, A B B A; A = off at 1 and 32 in "
        "flight, on at 8",
        "receiver": {
            "spans_received": sum(spans.values()), "by_service": spans,
            "requests_sent": sum(r["requests"] + r["warmup_requests"] for r in traced),
        },
        "on": {EXACT: rows[EXACT][ON], AGENT: rows[AGENT][ON]},
    }  # fmt: skip
    return out


def against_target(plan: Plan, target: Target) -> Outcome:
    out = Outcome()
    out.cases[EXACT] = [combine(target, n, [_exact(plan, target, n)]) for n in plan.levels]
    out.cases[SEMANTIC] = [_semantic(plan, target, level) for level in plan.levels]
    _mixed(plan, target, out)
    skipped = f"--target {target.address}: needs a stack the bench starts itself"
    out.tracing = {"skipped": skipped}
    out.cases[AGENT] = out.cases[UNRELATED] = {"skipped": skipped}
    return out
