"""The 20-position lookback counts a run of consecutive tool_use blocks as one position, and a run
of consecutive tool_result blocks as one (https://platform.claude.com/docs/en/build-with-claude/
prompt-caching: "so a turn with many parallel tool calls doesn't push the previous request's
entry out of the window on its own"). Blocks built directly (exact token counts), both warm
stores (the ``warm_store`` fixture)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

from cachemesh.v1 import gateway_pb2 as pb
from services.common.clock import ManualClock
from services.common.models import load_model_table
from services.common.prompt import Block, canonical_blocks
from services.common.tokens import load_cl100k
from services.prefix_cache.rules import Site, Split, plan_prompt, settle
from services.prefix_cache.warm import Scope, WarmStore

if TYPE_CHECKING:
    from services.common.prompt import BlockKind

LARGE = load_model_table().models["sim-large"]
SCOPE: Scope = ("tenant-a", "sim-large")

Part = tuple[str, "BlockKind", int, str | None]  # (content id, kind, tokens, breakpoint)


def make(parts: Sequence[Part]) -> list[Block]:
    blocks, chain = [], "root"
    for i, (content, kind, tokens, ttl) in enumerate(parts):
        chain = hashlib.sha256(f"{chain}/{content}".encode()).hexdigest()
        blocks.append(Block("messages", i, content, tuple(range(tokens)), ttl, chain, kind))
    return blocks


async def turn(store: WarmStore, blocks: Sequence[Block], now_ms: int) -> Split:
    sites = [Site(f"request.messages[{i}].content[0]", False) for i in range(len(blocks))]
    plan = plan_prompt(blocks, sites, LARGE, 20)
    hit = await store.settle(SCOPE, plan.probes, plan.writes, now_ms)
    return settle(plan, hit.tokens if hit else 0)


def agent_turn(calls: int, *, marked_last: bool) -> list[Part]:
    """System, a question (turn 1's breakpoint), then ``calls`` parallel tool calls and their
    results, the breakpoint on the last result."""
    parts: list[Part] = [("sys", "text", 2000, None), ("q", "text", 100, None)]
    parts += [(f"use{i}", "tool_use", 10, None) for i in range(calls)]
    parts += [
        (f"res{i}", "tool_result", 10, "5m" if marked_last and i == calls - 1 else None)
        for i in range(calls)
    ]
    return parts


CC = pb.CacheControl()
CITIES = ["Paris", "Rome", "Oslo", "Lima", "Cairo", "Tokyo", "Quito", "Dakar", "Perth", "Riga"]


def first_request() -> pb.CompleteRequest:
    system = " ".join(f"Rule {i}: answer briefly and cite the policy section." for i in range(120))
    question = pb.ContentBlock(text="What is the weather in these cities?", cache_control=CC)
    return pb.CompleteRequest(
        model="sim-large",
        system=[pb.ContentBlock(text=system)],
        messages=[pb.Message(role=pb.ROLE_USER, content=[question])],
    )


def parallel_calls_request(calls: int) -> pb.CompleteRequest:
    """The first request, then ``calls`` parallel tool calls and their results, the breakpoint
    moved to the last result."""
    request = first_request()
    request.messages[0].content[0].ClearField("cache_control")
    uses = [
        pb.ContentBlock(
            tool_use=pb.ToolUse(id=f"tu_{i}", name="weather", input_json=json.dumps({"c": c}))
        )
        for i, c in enumerate(CITIES[:calls])
    ]
    results = [
        pb.ContentBlock(tool_result=pb.ToolResult(tool_use_id=f"tu_{i}", content=f"{c}: 18C"))
        for i, c in enumerate(CITIES[:calls])
    ]
    results[-1].cache_control.CopyFrom(CC)
    request.messages.append(pb.Message(role=pb.ROLE_ASSISTANT, content=uses))
    request.messages.append(pb.Message(role=pb.ROLE_USER, content=results))
    return request


async def test_parallel_tool_calls_and_results_are_one_position_each(
    warm_store: WarmStore,
) -> None:
    """Turn 1 writes through the question; turn 2 adds 10 parallel calls and their 10 results
    (20 blocks, 2 positions): the breakpoint's window (results, calls, question, ...) still
    holds turn 1's entry, which is read, not written again in full (as the provider bills)."""
    store, clock, tok = warm_store, ManualClock(), load_cl100k()
    first = canonical_blocks(first_request(), tok)
    written = sum(b.tokens for b in first)
    assert await turn(store, first, clock.now_ms()) == Split(0, written, 0, 0)
    clock.advance(s=30)
    second = canonical_blocks(parallel_calls_request(10), tok)
    total = sum(b.tokens for b in second)
    assert await turn(store, second, clock.now_ms()) == Split(0, total - written, 0, written)


async def test_an_entry_inside_a_run_of_results_is_found(warm_store: WarmStore) -> None:
    """An earlier request's breakpoint on the first of 20 results (21 blocks before the next
    breakpoint, 2 positions): every block of a position in the window is checked, so it is
    read."""
    store, clock = warm_store, ManualClock()
    parts = agent_turn(20, marked_last=False)
    earlier = [*parts[:22], ("res0", "tool_result", 10, "5m")]
    await turn(store, make(earlier), clock.now_ms())
    later = [*parts, ("u2", "text", 50, "5m")]
    assert await turn(store, make(later), clock.now_ms()) == Split(0, 190 + 50, 0, 2310)


async def test_other_blocks_still_count_one_position_each(warm_store: WarmStore) -> None:
    """Runs collapse only tool_use and tool_result blocks: 20 text blocks after the entry push
    it out of the window (the breakpoint plus 19 earlier positions)."""
    store, clock = warm_store, ManualClock()
    head: list[Part] = [("sys", "text", 2000, "5m")]
    unmarked: list[Part] = [("sys", "text", 2000, None)]
    await turn(store, make(head), clock.now_ms())
    texts: list[Part] = [(f"t{i}", "text", 10, "5m" if i == 19 else None) for i in range(20)]
    assert await turn(store, make(unmarked + texts), clock.now_ms()) == Split(0, 2200, 0, 0)
    # alternating uses and results are no run: each is a position of its own
    await turn(store, make(head), clock.now_ms())
    mixed: list[Part] = [
        (f"b{i}", "tool_use" if i % 2 == 0 else "tool_result", 10, "5m" if i == 19 else None)
        for i in range(20)
    ]
    assert await turn(store, make(unmarked + mixed), clock.now_ms()) == Split(0, 2200, 0, 0)


def test_canonical_blocks_carry_their_kind() -> None:
    tok = load_cl100k()
    request = pb.CompleteRequest(
        model="sim-large",
        tools=[pb.Tool(name="weather", description="d", input_schema_json="{}")],
        system=[pb.ContentBlock(text="be brief")],
        messages=[
            pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="weather?")]),
            pb.Message(
                role=pb.ROLE_ASSISTANT,
                content=[pb.ContentBlock(tool_use=pb.ToolUse(id="t1", name="weather"))],
            ),
            pb.Message(
                role=pb.ROLE_USER,
                content=[pb.ContentBlock(tool_result=pb.ToolResult(tool_use_id="t1"))],
            ),
        ],
    )
    kinds = [b.kind for b in canonical_blocks(request, tok)]
    assert kinds == ["tool", "text", "text", "tool_use", "tool_result"]
