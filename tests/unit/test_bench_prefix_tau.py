"""make bench-prefix's tau-bench replay replays only requests the router accepts, and the
recorded tool call ids (which repeat within a conversation) are made unique by one rule."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from cachemesh.loadtest.workloads.tau import CallIds
from cachemesh.v1 import gateway_pb2 as pb
from services.common.models import load_model_table
from services.common.tokens import load_tokenizers
from services.router.validation import validate_request
from services.tools.bench.prefix_cache import tau
from tests.public_data import data_dir

TABLE = load_model_table()


def test_a_repeated_call_id_is_made_unique_and_its_result_answers_its_latest_use() -> None:
    ids = CallIds()
    first = ids.call("call_a", 1)
    assert ids.result("call_a") == first == "call_a"
    again = ids.call("call_a", 3)
    twice_in_one_message = ids.call("call_a", 3)
    assert len({first, again, twice_in_one_message}) == 3
    assert ids.result("call_a") == twice_in_one_message
    # a generated id is never given again, even to a recorded id spelled like it
    assert ids.call(again, 5) not in {first, again, twice_in_one_message}
    assert ids.result("unknown") == "unknown"  # as recorded: the router says what is wrong


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
    tmp_path: Path,
) -> None:
    source = data_dir() / "agent" / "tau_bench"
    for name in ("airline_tools.json", "airline_system_prompt_wiki.md"):
        shutil.copy(source / name, tmp_path / name)
    call = {"id": "", "type": "function", "function": {"name": "think", "arguments": "{}"}}
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "", "name": "think", "content": "ok"},
        {"role": "assistant", "content": "done"},
    ]
    (tmp_path / tau.TRAJECTORIES).write_text(json.dumps({"messages": messages}) + "\n")
    spec = TABLE.models["claude-sonnet-4"]
    with pytest.raises(tau.TauError, match=r"conversation 1 .*INVALID_ARGUMENT.*tool_use"):
        asyncio.run(
            tau.replay(TABLE, load_tokenizers([spec]), spec, pb.CACHE_TTL_5M, tmp_path, limit=10)
        )
