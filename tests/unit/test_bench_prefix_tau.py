"""make bench-prefix's tau-bench replay replays only requests the router accepts, and the
recorded tool call ids (which repeat within a conversation) are made unique by one rule."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from cachemesh.loadtest.workloads.tau import CallIds, conversation_requests, load_tools
from cachemesh.v1 import gateway_pb2 as pb
from services.common.models import load_model_table
from services.router.validation import validate_request
from services.tools.bench.prefix_cache import __main__ as prefix_bench
from services.tools.bench.prefix_cache import mooncake, tau
from tests.public_data import data_dir

TABLE = load_model_table()


def test_a_repeated_call_id_is_made_unique_and_each_result_answers_one_use() -> None:
    ids = CallIds()
    first = ids.call("call_a", 1)
    assert ids.result("call_a") == first == "call_a"
    again = ids.call("call_a", 3)
    twice_in_one_message = ids.call("call_a", 3)
    assert len({first, again, twice_in_one_message}) == 3
    # two calls of one message, then two results: each answers one call, in order (it was
    # the latest use for both: a request the router refuses)
    assert [ids.result("call_a"), ids.result("call_a")] == [again, twice_in_one_message]
    assert ids.result("call_a") == twice_in_one_message  # every use answered: the latest
    # a generated id is never given again, even to a recorded id spelled like it
    assert ids.call(again, 5) not in {first, again, twice_in_one_message}
    assert ids.result("unknown") == "unknown"  # as recorded: the router says what is wrong


def test_a_result_answers_a_call_of_the_latest_message_not_an_unanswered_older_one() -> None:
    ids = CallIds()
    ids.call("call_a", 1)  # never answered
    latest = ids.call("call_a", 3)
    assert ids.result("call_a") == latest


@pytest.mark.parametrize("place", ["agent", "bench"])
def test_one_message_calling_an_id_twice_then_two_results_passes_validation(
    place: str, tmp_path: Path
) -> None:
    call = {"id": "call_A", "type": "function", "function": {"name": "think", "arguments": "{}"}}
    raw: list[dict[str, Any]] = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [call, call]},
        {"role": "tool", "tool_call_id": "call_A", "name": "think", "content": "one"},
        {"role": "tool", "tool_call_id": "call_A", "name": "think", "content": "two"},
        {"role": "assistant", "content": "done"},
    ]
    tools = load_tools(data_dir() / "agent" / "tau_bench" / "airline_tools.json")
    request = _last_request(place, raw, tools, tmp_path)
    uses = [b.tool_use.id for m in request.messages for b in m.content if b.HasField("tool_use")]
    answers = [
        b.tool_result.tool_use_id
        for m in request.messages
        for b in m.content
        if b.HasField("tool_result")
    ]
    assert uses == ["call_A", "call_A-1"] and answers == uses
    validate_request(request, TABLE, set(TABLE.models))


def _last_request(
    place: str, raw: list[dict[str, Any]], tools: list[pb.Tool], tmp_path: Path
) -> pb.CompleteRequest:
    """The request of the conversation ``raw``'s last assistant turn: as the agent workload
    sends it, or as bench-prefix's replay builds it (from a trajectory file, as it reads one)."""
    if place == "agent":
        *_, request = conversation_requests({"messages": raw}, tools, "claude-sonnet-4", 64, "ns")
        return request
    source = data_dir() / "agent" / "tau_bench"
    for name in ("airline_tools.json", "airline_system_prompt_wiki.md"):
        shutil.copy(source / name, tmp_path / name)
    (tmp_path / tau.TRAJECTORIES).write_text(json.dumps({"messages": raw}) + "\n")
    loaded, system, turns = tau.load_turns(tmp_path, 10)
    request = tau.request_of(loaded, system, turns[-1], pb.CACHE_TTL_5M)
    request.model = "claude-sonnet-4"
    return request


@pytest.mark.parametrize("place", ["agent", "bench"])
def test_parallel_calls_results_are_one_user_message_and_pass_validation(
    place: str, tmp_path: Path
) -> None:
    """An assistant message with two calls, then their two results: bench-prefix's replay put
    each result in its own user message, which the router refuses ("'call_2' has no
    tool_result in messages[2]"); both converters now merge them, as the agent workload did."""

    def call(i: str) -> dict[str, Any]:
        return {"id": i, "type": "function", "function": {"name": "think", "arguments": "{}"}}

    raw: list[dict[str, Any]] = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [call("call_1"), call("call_2")]},
        {"role": "tool", "tool_call_id": "call_1", "name": "think", "content": "one"},
        {"role": "tool", "tool_call_id": "call_2", "name": "think", "content": "two"},
        {"role": "assistant", "content": "done"},
    ]
    tools = load_tools(data_dir() / "agent" / "tau_bench" / "airline_tools.json")
    request = _last_request(place, raw, tools, tmp_path)
    results = request.messages[-1]
    assert len(request.messages) == 3 and results.role == pb.ROLE_USER
    assert [b.tool_result.tool_use_id for b in results.content] == ["call_1", "call_2"]
    assert [b.tool_result.content for b in results.content] == ["one", "two"]
    validate_request(request, TABLE, set(TABLE.models))


def test_every_replayed_request_passes_the_routers_validation() -> None:
    """The bench's default 200 conversations: 278 of the 2,454 requests reused a tool call id
    (refused live: "... is used twice") before the ids were made unique."""
    tools, system, turns = tau.load_turns(data_dir() / "agent" / "tau_bench", 200)
    assert len(turns) == 2454
    refused = 0
    for turn in turns:
        request = tau.request_of(tools, system, turn, pb.CACHE_TTL_5M)
        request.model = "claude-sonnet-4"
        try:
            validate_request(request, TABLE, set(TABLE.models))
        except Exception:
            refused += 1
    assert refused == 0


def test_a_conversation_the_router_would_refuse_stops_the_replay_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    tau_dir = data / "agent" / "tau_bench"
    tau_dir.mkdir(parents=True)
    source = data_dir() / "agent" / "tau_bench"
    for name in ("airline_tools.json", "airline_system_prompt_wiki.md"):
        shutil.copy(source / name, tau_dir / name)
    call = {"id": "", "type": "function", "function": {"name": "think", "arguments": "{}"}}
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "", "name": "think", "content": "ok"},
        {"role": "assistant", "content": "done"},
    ]
    (tau_dir / tau.TRAJECTORIES).write_text(json.dumps({"messages": messages}) + "\n")
    spec = TABLE.models["claude-sonnet-4"]
    with pytest.raises(tau.TauError, match=r"conversation 1 .*INVALID_ARGUMENT.*tool_use"):
        tau.check(tau.load(tau_dir, 10), TABLE, [(spec, pb.CACHE_TTL_5M)])
    # the bench: refused before any replay (each replay validated its own turns: a bad one
    # was found once the replays before it had run), exit 2 naming the conversation
    trace = tmp_path / "trace.jsonl"
    trace.write_text(_TRACE)
    replays: list[object] = []

    async def replay(*args: Any, **kwargs: Any) -> dict[str, Any]:
        replays.append(args)
        raise AssertionError("a replay ran")

    monkeypatch.setattr(tau, "replay", replay)
    out = tmp_path / "r.json"
    code = prefix_bench.main(["--data", str(data), "--trace", str(trace), "--out", str(out)])
    assert code == 2 and replays == [] and not out.exists()
    assert "conversation 1 (line 1) builds a request the router refuses" in capsys.readouterr().err


# three arrivals of Mooncake's format: the trace half of the bench, kept small
_TRACE = "".join(
    json.dumps({"timestamp": t, "input_length": 1024, "output_length": 8, "hash_ids": [1, 2]})
    + "\n"
    for t in (0, 10, 20)
)


def test_the_bench_reads_the_conversations_once_and_checks_a_turn_once_a_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It read the trajectories three times (a replay each) and validated each turn three
    times; now once, and once for each model replayed (claude-sonnet-4, gpt-4o): the two
    claude-sonnet-4 replays differ only in their breakpoints' TTL."""
    source = data_dir() / "agent" / "tau_bench"
    turns = len(tau.load_turns(source, 5)[2])
    counted = {"read": 0, "validated": 0}
    read, validate = tau.load_turns, validate_request

    def load_turns(*args: Any) -> Any:
        counted["read"] += 1
        return read(*args)

    def validated(*args: Any) -> None:
        counted["validated"] += 1
        validate(*args)

    monkeypatch.setattr(tau, "load_turns", load_turns)
    monkeypatch.setattr(tau, "validate_request", validated)
    trace = tmp_path / "trace.jsonl"
    trace.write_text(_TRACE)
    args = argparse.Namespace(data=str(data_dir()), conversations=5, capacity_blocks=64)
    result = asyncio.run(prefix_bench.run(args, trace, mooncake.load_trace(trace)))
    replayed = result["tau_bench_airline"]
    assert [replayed[k]["requests"] for k in ("anthropic_5m", "anthropic_1h", "openai")] == [
        turns
    ] * 3
    assert counted == {"read": 1, "validated": 2 * turns}
