"""tau-bench airline conversations replayed through PrefixCacheCore on a virtual clock.

Every assistant turn of a conversation is one request: the 14 airline tools, the airline system
prompt and the conversation so far, in order. Conversations start ``start_gap_s`` apart and
interleave; within one, the next request follows ``model_s`` after a tool result, or
``model_s`` plus an exponential think time (mean ``think_mean_s``, seeded) after a user turn,
so some pauses outlast a 5-minute cache entry. Anthropic breakpoints: the system prompt and the
last block of the prompt (the usual agent layout); OpenAI caches automatically.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cachemesh.loadtest.workloads.tau import CallIds, add_tool_result
from cachemesh.v1 import gateway_pb2 as pb
from services.common.clock import ManualClock
from services.common.errors import RequestError
from services.common.models import ModelSpec, ModelTable
from services.common.tokens import Tokenizer, Tokenizers
from services.prefix_cache.commit_records import CommitRecords
from services.prefix_cache.core import PrefixCacheCore, TokenizerSlot
from services.prefix_cache.ledger import InMemoryLedger
from services.prefix_cache.pricing import cost_nanos
from services.prefix_cache.replica_view import ReplicaViews
from services.prefix_cache.rules import Split
from services.prefix_cache.totals import TotalsLedger
from services.prefix_cache.warm import InMemoryWarmStore
from services.router.validation import validate_request

START_GAP_S, MODEL_S, THINK_MEAN_S, SEED = 30.0, 4.0, 60.0, 7
TRAJECTORIES = "airline_gpt-4o_trajectories.jsonl"


class TauError(ValueError):
    """The tau-bench data builds a request the router would refuse."""


@dataclass(frozen=True)
class Turn:
    at_ms: int
    conversation: int
    messages: tuple[pb.Message, ...]
    output_text: str


def _text(value: Any) -> str:
    return "" if value is None or value == "None" else str(value)


def _tool_result(raw: dict[str, Any], ids: CallIds) -> pb.ToolResult:
    """The tool message ``raw`` as a result answering its call's unique id (``ids``)."""
    return pb.ToolResult(
        tool_use_id=ids.result(str(raw.get("tool_call_id", ""))), content=_text(raw["content"])
    )


def _message(raw: dict[str, Any], ids: CallIds, place: int) -> pb.Message:
    """``raw``, the conversation's message ``place``, its tool call ids made unique by ``ids``
    (the conversation's: recorded ids repeat, which the router refuses); a user's or an
    assistant's (``load_turns`` adds a tool message's result with ``add_tool_result``)."""
    role = raw["role"]
    blocks = [pb.ContentBlock(text=_text(raw.get("content")))] if _text(raw.get("content")) else []
    for call in raw.get("tool_calls") or []:
        use = pb.ToolUse(
            id=ids.call(str(call["id"]), place),
            name=call["function"]["name"],
            input_json=call["function"]["arguments"],
        )
        blocks.append(pb.ContentBlock(tool_use=use))
    if not blocks:
        blocks = [pb.ContentBlock(text="(no content)")]
    return pb.Message(
        role=pb.ROLE_ASSISTANT if role == "assistant" else pb.ROLE_USER, content=blocks
    )


def load_turns(data: Path, limit: int) -> tuple[list[pb.Tool], str, list[Turn]]:
    tools = [
        pb.Tool(
            name=t["function"]["name"],
            description=t["function"]["description"],
            input_schema_json=json.dumps(t["function"]["parameters"], sort_keys=True),
        )
        for t in json.loads((data / "airline_tools.json").read_text())
    ]
    system = (data / "airline_system_prompt_wiki.md").read_text()
    rng = random.Random(SEED)
    turns: list[Turn] = []
    lines = (data / TRAJECTORIES).read_text().splitlines()[:limit]
    for c, line in enumerate(lines):
        raw = [m for m in json.loads(line)["messages"] if m["role"] != "system"]
        t = c * START_GAP_S
        history: list[pb.Message] = []
        ids = CallIds()
        for k, message in enumerate(raw):
            if message["role"] == "tool":  # consecutive results: one user message, as the
                # agent workload sends them (the router refuses a call answered a message late)
                add_tool_result(history, _tool_result(message, ids))
                continue
            out = _message(message, ids, k)
            if message["role"] == "assistant" and history:
                previous = raw[k - 1]["role"]
                t += MODEL_S + (rng.expovariate(1 / THINK_MEAN_S) if previous == "user" else 0)
                text = "".join(b.text or b.tool_use.input_json for b in out.content)
                turns.append(Turn(int(t * 1000), c, tuple(history), text))
            history.append(out)
    turns.sort(key=lambda turn: (turn.at_ms, turn.conversation))
    return tools, system, turns


@dataclass(frozen=True)
class Conversations:
    """The conversations' requests as ``load_turns`` reads them, from ``data``: read once for
    every replay of them (each replay read and parsed the file again)."""

    data: Path
    tools: list[pb.Tool]
    system: str
    turns: list[Turn]


def load(data: Path, limit: int) -> Conversations:
    return Conversations(data, *load_turns(data, limit))


def check(
    conversations: Conversations,
    table: ModelTable,
    replays: Sequence[tuple[ModelSpec, pb.CacheTtl.ValueType]],
) -> None:
    """Before any replay: each turn validated as the router would, once for each model the
    replays send it to (a replay of what the router refuses measures nothing; each replay
    validated every turn again, and a bad one was found only once the replays before it had
    run). A model's replays differ only in the TTL of the breakpoints, one TTL for all of a
    request's, which the router's check takes either way: its first replay's TTL stands for
    them."""
    checked: set[str] = set()
    for spec, ttl in replays:
        if spec.id in checked:
            continue
        checked.add(spec.id)
        for turn in conversations.turns:
            request = request_of(conversations.tools, conversations.system, turn, ttl)
            request.model = spec.id
            try:
                validate_request(request, table, {spec.id})
            except RequestError as exc:
                raise TauError(
                    f"{conversations.data / TRAJECTORIES}: conversation {turn.conversation + 1} "
                    f"(line {turn.conversation + 1}) builds a request the router refuses "
                    f"({exc.code.name}: {exc.message})"
                ) from None


def request_of(
    tools: list[pb.Tool], system: str, turn: Turn, ttl: pb.CacheTtl.ValueType
) -> pb.CompleteRequest:
    control = pb.CacheControl(ttl=ttl)
    request = pb.CompleteRequest(
        tools=tools,
        system=[pb.ContentBlock(text=system, cache_control=control)],
        messages=list(turn.messages),
        max_tokens=1024,
    )
    request.messages[-1].content[-1].cache_control.CopyFrom(control)
    return request


async def replay(
    table: ModelTable,
    tokenizer: Tokenizers | Tokenizer,
    spec: ModelSpec,
    ttl: pb.CacheTtl.ValueType,
    conversations: Conversations,
    also_priced: tuple[ModelSpec, ...] = (),
) -> dict[str, Any]:
    """The replay of ``conversations`` (``check``ed for ``spec`` first: the router refuses
    none of them) through a fresh prefix-cache under ``spec``'s rules and ``ttl``."""
    tools, system, turns = conversations.tools, conversations.system, conversations.turns
    counting = Tokenizers.of(tokenizer).for_spec(spec)  # the row's vocabulary
    clock = ManualClock(start_ms=0)
    core = PrefixCacheCore(
        table=table,
        tokenizer=TokenizerSlot(tokenizer),
        cache=InMemoryWarmStore(),
        views=ReplicaViews(1),
        ledger=InMemoryLedger(CommitRecords(ttl_ms=86_400_000), TotalsLedger()),
        clock=clock,
        lookback=20,
    )
    sums = Split(0, 0, 0, 0)
    priced_as = (spec, *also_priced)
    # each request priced on its own: a long-context tier is a request's prompt length
    costs = dict.fromkeys((p.id for p in priced_as), 0)
    baselines = dict(costs)
    for i, turn in enumerate(turns):
        clock.advance(ms=turn.at_ms - clock.now_ms())
        request = request_of(tools, system, turn, ttl)
        request.model = spec.id
        split = await core.warm("tau", f"r{i}", spec.id, request, "")
        await core.final("tau", f"r{i}", spec.id, counting.count(turn.output_text), 0, "")
        sums = Split(
            sums.input_tokens + split.input_tokens,
            sums.write_5m_tokens + split.write_5m_tokens,
            sums.write_1h_tokens + split.write_1h_tokens,
            sums.read_tokens + split.read_tokens,
        )
        for priced in priced_as:
            costs[priced.id] += cost_nanos(split, 0, priced)
            baselines[priced.id] += priced.baseline_nanos(split.prompt_tokens, 0)
    result: dict[str, Any] = {
        "model": spec.id,
        "rules": spec.rules,
        "requests": len(turns),
        "conversations": len({t.conversation for t in turns}),
        "prompt_tokens": sums.prompt_tokens,
        "read_tokens": sums.read_tokens,
        "write_5m_tokens": sums.write_5m_tokens,
        "write_1h_tokens": sums.write_1h_tokens,
        "hit_rate_tokens": round(sums.read_tokens / max(sums.prompt_tokens, 1), 4),
        "input_cost": {},
    }
    for priced in priced_as:
        cost, baseline = costs[priced.id], baselines[priced.id]
        result["input_cost"][priced.id] = {
            "cost_usd": round(cost / 1e9, 4),
            "no_cache_usd": round(baseline / 1e9, 4),
            "saving": round(1 - cost / baseline, 4),
        }
    return result
