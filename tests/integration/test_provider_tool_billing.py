"""A tool call's arguments are output tokens the provider bills: a stream cut while (or
after) the model writes one, or an engine that reports no usage, counts them too."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from services.common.tokens import load_cl100k
from tests.integration.test_provider_streams import (
    CLAUDE,
    GPT,
    _api,
    _ends,
    _generate,
    loopback_providers,
)
from tests.providers import anthropic_wire, openai_wire
from tests.providers.wire_server import Reply, WireServer

ARGUMENTS = json.dumps({"path": "report.md", "content": "Quarterly revenue grew. " * 300})
PIECES = [ARGUMENTS[i : i + 200] for i in range(0, len(ARGUMENTS), 200)]
TOOL_TOKENS = load_cl100k().count(ARGUMENTS)  # ~1,200
# the requests' max_tokens: room for the tool call, as a provider requires (a tool call's
# arguments are visible output, which the replica cuts well past max_tokens)
TOOL_ROOM = 4096


@pytest.fixture(scope="module")
def server() -> Iterator[WireServer]:
    yield from loopback_providers()


def _cut_in_the_tool_call(backend: str) -> Reply:
    """The connection drops after most of the tool call's JSON, before any stop event."""
    if backend == "anthropic":
        tool = anthropic_wire.ToolCall("toolu_01", "write_file", PIECES)
        events = anthropic_wire.stream(
            CLAUDE, ["I'll write it."], anthropic_wire.Usage(25), tool=tool, stop_reason="tool_use"
        )
        last_delta = max(i for i, e in enumerate(events) if e[0] == "content_block_delta")
        return Reply(events=events[:last_delta], cut=True)
    events = openai_wire.stream(
        GPT, ["I'll write it."], None, finish="tool_calls", tool=("call_1", "write_file", PIECES)
    )
    return Reply(events=events[:-4], cut=True)  # the last piece, finish, report and [DONE] lost


@pytest.mark.parametrize(("backend", "model"), [("anthropic", CLAUDE), ("openai", GPT)])
def test_a_stream_cut_in_a_tool_call_bills_the_tool_calls_tokens(
    server: WireServer, backend: str, model: str
) -> None:
    server.script(backend, _cut_in_the_tool_call(backend))
    chunks = _generate(_api(server, backend), model, TOOL_ROOM)
    (end,) = _ends(chunks)
    assert end.interrupted
    # all but the last 200 characters of the JSON were written (and are billed)
    assert end.output_tokens >= TOOL_TOKENS * 0.8
    if backend == "anthropic":
        assert end.provider_usage.anthropic.output_tokens == end.output_tokens
    # a call the router cuts there, or whose caller leaves, gets no end: it is billed the
    # last progress's running count, the end's count of the same pieces (and the pieces since
    # its last whole count, at most an eighth of them, counted each alone: a little more)
    last = [c.progress for c in chunks if c.WhichOneof("part") == "progress"][-1]
    assert end.output_tokens <= last.output_tokens <= end.output_tokens * 9 / 8


def test_an_engine_without_usage_counts_its_tool_calls(server: WireServer) -> None:
    # an OpenAI-compatible engine without stream_options support: no usage chunk
    server.script(
        "openai",
        Reply(
            events=openai_wire.stream(
                GPT, [], None, finish="tool_calls", tool=("call_1", "write_file", PIECES)
            )
        ),
    )
    (end,) = _ends(_generate(_api(server, "openai"), GPT, TOOL_ROOM))
    assert not end.interrupted and not end.HasField("provider_usage")
    assert end.output_tokens >= TOOL_TOKENS
