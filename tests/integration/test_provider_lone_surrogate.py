"""A provider's stream whose text, thinking or tool call holds a lone UTF-16 surrogate escape
(half a character: ``"\\ud83d"``), which the SDKs' JSON reads as is: the answer is served whole,
the half character shown as U+FFFD. Before, the chunk could not be built (protobuf carries
UTF-8, which has no surrogates) and an Anthropic answer broke off there: billed, cut, retried."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.integration.test_provider_streams import CLAUDE, GPT, _api, _ends, _generate
from tests.integration.test_provider_streams import loopback_providers as _loopback
from tests.providers import anthropic_wire, openai_wire
from tests.providers.wire_server import Reply, WireServer

HALF = "\ud83d"  # the first half of a surrogate pair, alone


@pytest.fixture(scope="module")
def server() -> Iterator[WireServer]:
    yield from _loopback()


def _served_text(server: WireServer, backend: str, model: str, texts: list[str]) -> str:
    """The text served of a stream of ``texts``, answered whole."""
    if backend == "anthropic":
        events = anthropic_wire.stream(CLAUDE, texts, anthropic_wire.Usage(25))
    else:
        events = openai_wire.stream(GPT, texts, None)
    server.script(backend, Reply(events=events))
    chunks = _generate(_api(server, backend), model)
    (end,) = _ends(chunks)
    assert not end.interrupted, end.error
    return "".join(c.text for c in chunks if c.WhichOneof("part") == "text")


@pytest.mark.parametrize(("backend", "model"), [("anthropic", CLAUDE), ("openai", GPT)])
def test_a_lone_surrogate_in_the_text_is_served_as_a_replacement_character(
    server: WireServer, backend: str, model: str
) -> None:
    served = _served_text(server, backend, model, [f"smile {HALF}", " and more"])
    assert served == "smile \ufffd and more"


def test_a_lone_surrogate_in_a_tool_call_keeps_the_call(server: WireServer) -> None:
    arguments = json.dumps({"note": f"cut {HALF}"}, ensure_ascii=False)
    tool = anthropic_wire.ToolCall("toolu_01", "save", [arguments])
    events = anthropic_wire.stream(
        CLAUDE, ["Saving."], anthropic_wire.Usage(25), tool=tool, stop_reason="tool_use"
    )
    server.script("anthropic", Reply(events=events))
    chunks = _generate(_api(server, "anthropic"), CLAUDE)
    (end,) = _ends(chunks)
    assert not end.interrupted, end.error
    (call,) = [c.block.tool_use for c in chunks if c.WhichOneof("part") == "block"]
    assert call.name == "save" and json.loads(call.input_json) == {"note": "cut \ufffd"}


@pytest.mark.parametrize(("backend", "model"), [("anthropic", CLAUDE), ("openai", GPT)])
def test_a_character_split_between_two_pieces_is_served_whole(
    server: WireServer, backend: str, model: str
) -> None:
    # an emoji's UTF-16 halves, each escaped in its own event: before, two U+FFFD
    served = _served_text(server, backend, model, ["I love \ud83d", "\ude00 pizza"])
    assert served == "I love \U0001f600 pizza"


def test_a_character_split_between_two_pieces_of_a_tool_call_is_kept_whole(
    server: WireServer,
) -> None:
    # the JSON's text holds the emoji's halves as characters, one in each piece (each escaped
    # in its own event): before, {"q": "\ufffd\ufffd"}
    pieces = ['{"q": "\ud83d', '\ude00"}']
    tool = anthropic_wire.ToolCall("toolu_01", "find", pieces)
    events = anthropic_wire.stream(
        CLAUDE, ["Looking."], anthropic_wire.Usage(25), tool=tool, stop_reason="tool_use"
    )
    server.script("anthropic", Reply(events=events))
    chunks = _generate(_api(server, "anthropic"), CLAUDE)
    (call,) = [c.block.tool_use for c in chunks if c.WhichOneof("part") == "block"]
    assert json.loads(call.input_json) == {"q": "\U0001f600"}
