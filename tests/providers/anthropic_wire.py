"""The Anthropic Messages API's wire format, as https://docs.claude.com/en/api/messages-streaming
and https://docs.claude.com/en/api/errors show it: the SSE event sequence (message_start with
the usage of the prompt, content_block_start / ping / content_block_delta / content_block_stop,
message_delta with the stop reason and output usage, message_stop), error events and bodies,
and the request checks of https://platform.claude.com/docs/en/api/versioning (``refusal``)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from tests.providers.schema_types import bad_type
from tests.providers.wire_server import Event, Reply, dumps


@dataclass
class Usage:
    input_tokens: int = 0
    cache_creation_5m: int = 0
    cache_creation_1h: int = 0
    cache_read_input_tokens: int = 0
    output_tokens: int = 0
    # of output_tokens, the thinking's (message_delta's ``output_tokens_details``, which the
    # SDK 2.x reads); None: not reported
    thinking_tokens: int | None = None

    def delta(self) -> dict[str, Any]:
        """message_delta's usage."""
        usage: dict[str, Any] = {"output_tokens": self.output_tokens}
        if self.thinking_tokens is not None:
            usage["output_tokens_details"] = {"thinking_tokens": self.thinking_tokens}
        return usage

    def start(self) -> dict[str, Any]:
        return {
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": self.cache_creation_5m + self.cache_creation_1h,
            "cache_read_input_tokens": self.cache_read_input_tokens,
            "cache_creation": {
                "ephemeral_5m_input_tokens": self.cache_creation_5m,
                "ephemeral_1h_input_tokens": self.cache_creation_1h,
            },
            "output_tokens": 1,
            "service_tier": "standard",
        }


@dataclass
class ToolCall:
    id: str
    name: str
    json_pieces: list[str] = field(default_factory=list)


def stream(
    model: str,
    texts: list[str],
    usage: Usage,
    *,
    stop_reason: str = "end_turn",
    tool: ToolCall | None = None,
    error_after: int | None = None,
    thinking: tuple[str, ...] = (),
) -> list[Event]:
    """The events of one streamed message; ``error_after`` ends it with an ``error`` event
    (overloaded) after that many text deltas. ``thinking``: the pieces of a ``thinking`` block
    before the text (extended thinking: ``thinking_delta`` events, then its
    ``signature_delta``)."""
    text_at = 1 if thinking else 0  # the text block's index
    events: list[Event] = [
        (
            "message_start",
            dumps(
                {
                    "type": "message_start",
                    "message": {
                        "id": "msg_01LoopbackTest",
                        "type": "message",
                        "role": "assistant",
                        "content": [],
                        "model": model,
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": usage.start(),
                    },
                }
            ),
        ),
    ]
    if thinking:
        events.append(
            (
                "content_block_start",
                dumps(
                    {
                        "type": "content_block_start",
                        "index": 0,
                        "content_block": {"type": "thinking", "thinking": "", "signature": ""},
                    }
                ),
            )
        )
        for piece in thinking:
            events.append(
                (
                    "content_block_delta",
                    dumps(
                        {
                            "type": "content_block_delta",
                            "index": 0,
                            "delta": {"type": "thinking_delta", "thinking": piece},
                        }
                    ),
                )
            )
        signature = {"type": "signature_delta", "signature": "EqQBCgIYAhIMLoopbackSig"}
        events += [
            (
                "content_block_delta",
                dumps({"type": "content_block_delta", "index": 0, "delta": signature}),
            ),
            ("content_block_stop", dumps({"type": "content_block_stop", "index": 0})),
        ]
    events.append(
        (
            "content_block_start",
            dumps(
                {
                    "type": "content_block_start",
                    "index": text_at,
                    "content_block": {"type": "text", "text": ""},
                }
            ),
        )
    )
    events.append(("ping", dumps({"type": "ping"})))
    for n, text in enumerate(texts):
        if error_after is not None and n == error_after:
            events.append(("error", dumps(overloaded_body())))
            return events
        events.append(
            (
                "content_block_delta",
                dumps(
                    {
                        "type": "content_block_delta",
                        "index": text_at,
                        "delta": {"type": "text_delta", "text": text},
                    }
                ),
            )
        )
    events.append(("content_block_stop", dumps({"type": "content_block_stop", "index": text_at})))
    if tool is not None:
        events.append(
            (
                "content_block_start",
                dumps(
                    {
                        "type": "content_block_start",
                        "index": text_at + 1,
                        "content_block": {
                            "type": "tool_use",
                            "id": tool.id,
                            "name": tool.name,
                            "input": {},
                        },
                    }
                ),
            )
        )
        for piece in tool.json_pieces:
            events.append(
                (
                    "content_block_delta",
                    dumps(
                        {
                            "type": "content_block_delta",
                            "index": text_at + 1,
                            "delta": {"type": "input_json_delta", "partial_json": piece},
                        }
                    ),
                )
            )
        stop = {"type": "content_block_stop", "index": text_at + 1}
        events.append(("content_block_stop", dumps(stop)))
    events += [
        (
            "message_delta",
            dumps(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                    "usage": usage.delta(),
                }
            ),
        ),
        ("message_stop", dumps({"type": "message_stop"})),
    ]
    return events


def error_body(kind: str, message: str) -> dict[str, Any]:
    return {
        "type": "error",
        "error": {"type": kind, "message": message},
        "request_id": "req_loopback",
    }


def overloaded_body() -> dict[str, Any]:
    return {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}


def error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status=status, body=error_body(kind, message), headers=headers or {})


def _call_alone(events: list[Event]) -> list[Event]:
    """``stream``'s events of an answer of no text and one tool call, without the empty text
    block ``stream`` opens at index 0: the call alone, at index 0 (the API's answer to a
    forced choice)."""
    kept: list[Event] = []
    for name, data in events:
        event = json.loads(data) if name and name.startswith("content_block") else None
        if event is not None and event["index"] == 0:
            continue  # the empty text block's start and stop
        if event is not None:
            event["index"] -= 1
            data = dumps(event)
        kept.append((name, data))
    return kept


def forced_tool(body: dict[str, Any]) -> str | None:
    """The tool a request's ``tool_choice`` forces (``tool``: its name; ``any``: the first
    tool), else None (``auto``, ``none``, no choice)."""
    choice = body.get("tool_choice")
    if not isinstance(choice, dict) or choice.get("type") not in ("any", "tool"):
        return None
    if choice["type"] == "tool":
        return str(choice.get("name"))
    return str((body.get("tools") or [{}])[0].get("name"))


def default(body: dict[str, Any]) -> Reply:
    """A short answer, its usage counted roughly from the request (4 characters a token); a
    forced tool choice is answered with a call of that tool (the API forces it: no text before
    it, ``stop_reason`` tool_use)."""
    size = len(dumps(body.get("messages", []))) + len(dumps(body.get("system", [])))
    forced = forced_tool(body)
    if forced is not None:
        call = ToolCall("toolu_01LoopbackForced", forced, ["{}"])
        usage = Usage(input_tokens=max(1, size // 4), output_tokens=7)
        events = stream(str(body.get("model")), [], usage, stop_reason="tool_use", tool=call)
        return Reply(events=_call_alone(events))
    return Reply(
        events=stream(
            str(body.get("model")),
            ["Paris is ", "the capital ", "of France."],
            Usage(input_tokens=max(1, size // 4), output_tokens=7),
        )
    )


REJECTED = error(401, "authentication_error", "invalid x-api-key")

# Anthropic's API versions, oldest first (its "Versions" page); the SDK 2.x sends the newest
VERSIONS = ("2023-01-01", "2023-06-01", "2026-10-21")
# from 2026-10-21 on, the sampling parameters are removed: a request that sends any of them, at
# its default value too, is a 400 naming it as a field the API does not know; before, taken
# (https://platform.claude.com/docs/en/api/migration-2026-10-21)
NO_SAMPLING_SINCE = "2026-10-21"
SAMPLING = ("temperature", "top_p", "top_k")
# the models that refuse a sampling parameter at a non-default value under every version
# (Claude Opus 4.7 and later: Opus 4.7, 4.8 and 5, Sonnet 5; "sampling parameters (temperature,
# top_p, top_k) set to non-default values return a 400 error",
# https://platform.claude.com/docs/en/models/sonnet-5/migration-guide), a dated id too; the
# API's words: "`temperature` is deprecated for this model."
_DEFAULT_SAMPLING_ONLY = re.compile(r"^claude-(?:opus-4-[78]|opus-5|sonnet-5)(?:-\d{8})?$")
# the defaults such a model takes: temperature and top_p 1; top_k has none (unset: no cut), so
# any value of it is refused
_SAMPLING_DEFAULTS: dict[str, float] = {"temperature": 1, "top_p": 1}


def refusal(headers: dict[str, str], body: dict[str, Any]) -> Reply | None:
    """The real API's 400 to a request its ``anthropic-version`` or its model does not take,
    else None: no version, one that is not a version, (from 2026-10-21 on) a sampling
    parameter, or (under every version) one at a value but its default to a model that takes
    only its default (Claude Opus 4.7 and later: ``claude-sonnet-5``, ``claude-opus-5``)."""
    version = headers.get("anthropic-version")
    if version is None:
        return error(400, "invalid_request_error", "anthropic-version: header is required")
    if version not in VERSIONS:
        message = f"anthropic-version: {dumps(version)} is not a valid version"
        return error(400, "invalid_request_error", message)
    if version >= NO_SAMPLING_SINCE:  # ISO dates: their order is the strings' order
        for name in SAMPLING:
            if name in body:
                return error(
                    400, "invalid_request_error", f"{name}: Extra inputs are not permitted"
                )
    if (structure := _structure_refusal(body)) is not None:
        return error(400, "invalid_request_error", structure)
    if _DEFAULT_SAMPLING_ONLY.match(str(body.get("model"))):
        for name in SAMPLING:
            if name in body and body[name] != _SAMPLING_DEFAULTS.get(name):
                message = f"`{name}` is deprecated for this model."
                return error(400, "invalid_request_error", message)
    return None


MAX_BREAKPOINTS = 4
# the ids of tool_use blocks the API takes (an OpenAI-compatible engine's "functions.f:0" is
# refused: "messages.1.content.0.tool_use.id: String should match pattern '^[a-zA-Z0-9_-]+$'")
_TOOL_ID = re.compile(r"^[a-zA-Z0-9_-]+$")
# the names of tools it takes: the API's own 400 says 128 characters since mid-2025 ("tools.16.
# custom.name: String should match pattern '^[a-zA-Z0-9_-]{1,128}$'",
# modelcontextprotocol/modelcontextprotocol#1345), 64 before and in the tool reference
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")


def _blocks(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [block for block in content or [] if isinstance(block, dict)]


_TOOL_CHOICE_FIELDS = {
    "auto": {"type", "disable_parallel_tool_use"},
    "any": {"type", "disable_parallel_tool_use"},
    "tool": {"type", "name", "disable_parallel_tool_use"},
    "none": {"type"},
}


def _tool_choice_refusal(body: dict[str, Any]) -> str | None:
    """The API's 400 to a ``tool_choice`` it refuses (the Messages API reference: a type of
    auto, any, tool or none, ``name`` with tool alone, ``none`` without
    disable_parallel_tool_use); a forced choice (any, tool) without tools, and a tool name
    none of the tools has. The field paths are the API's; the words of the last two are this
    server's (the API's own were not on record here)."""
    choice = body.get("tool_choice")
    if choice is None:
        return None
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind not in _TOOL_CHOICE_FIELDS:
        return "tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'"
    for name in choice:
        if name not in _TOOL_CHOICE_FIELDS[kind]:
            return f"tool_choice.{kind}.{name}: Extra inputs are not permitted"
    names = [t.get("name") for t in body.get("tools") or [] if isinstance(t, dict)]
    if kind == "tool":
        if not isinstance(choice.get("name"), str):
            return "tool_choice.tool.name: Field required"
        if choice["name"] not in names:
            return f"tool_choice.tool.name: tool {dumps(choice['name'])} is not in tools"
    if kind in ("any", "tool") and not names:
        return "tool_choice: a forced tool choice needs tools"
    return None


def _structure_refusal(body: dict[str, Any]) -> str | None:
    """The message of the real API's 400 to a body whose shape it refuses, else None: a
    max_tokens below 1, a temperature outside [0, 1], a message with no content block but a
    last assistant one (anthropics/claude-code#6774, #4416), an empty or blank text block, a
    tool's name outside ``TOOL_NAME``, a tool's ``input_schema`` naming a type JSON Schema has not
    (``schema_types``), a tool_use id outside ``^[a-zA-Z0-9_-]+$`` or used twice, a message
    after tool calls that does not begin with their tool_result blocks (or a result matching
    no call of the message before), more than 4 ``cache_control`` breakpoints, a 1-hour
    breakpoint after a 5-minute one (tools, system, messages order). The messages are the
    API's (its errors as clients have met them; the prompt caching page for the TTL rule)."""
    if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] < 1:
        return "max_tokens: Input should be greater than or equal to 1"
    temperature = body.get("temperature")
    if isinstance(temperature, int | float) and not 0 <= temperature <= 1:
        return "temperature: Input should be less than or equal to 1"
    if (choice := _tool_choice_refusal(body)) is not None:
        return choice
    marks: list[str] = []  # each breakpoint's ttl, in the API's order
    for t, tool in enumerate(body.get("tools") or []):
        if isinstance(tool, dict) and not TOOL_NAME.match(str(tool.get("name"))):
            return f"tools.{t}.custom.name: String should match pattern '{TOOL_NAME.pattern}'"
        if isinstance(tool, dict) and bad_type(tool.get("input_schema")) is not None:
            return (
                f"tools.{t}.custom.input_schema: JSON schema is invalid. It must match JSON "
                "Schema draft 2020-12 (https://json-schema.org/draft/2020-12). Learn more about "
                "tool use at https://docs.claude.com/en/docs/tool-use."
            )
        if isinstance(tool, dict) and isinstance(tool.get("cache_control"), dict):
            marks.append(tool["cache_control"].get("ttl", "5m"))
    system = body.get("system")
    places = [("system", block) for block in _blocks(system)] if system is not None else []
    calls: list[str] = []  # the tool_use ids of the message before
    uses: set[str] = set()  # every tool_use id so far
    messages = body.get("messages") or []
    for m, message in enumerate(messages):
        blocks = _blocks(message.get("content"))
        final_answer = m == len(messages) - 1 and message.get("role") == "assistant"
        if not blocks and not final_answer:
            return (
                f"messages.{m}: all messages must have non-empty content except for the "
                "optional final assistant message"
            )
        results = 0
        for b, block in enumerate(blocks):
            if block.get("type") == "tool_use" and not _TOOL_ID.match(str(block.get("id"))):
                return (
                    f"messages.{m}.content.{b}.tool_use.id: String should match pattern "
                    f"'{_TOOL_ID.pattern}'"
                )
            if block.get("type") == "tool_use":
                if str(block.get("id")) in uses:
                    return f"messages.{m}.content.{b}: `tool_use` ids must be unique"
                uses.add(str(block.get("id")))
            if block.get("type") == "tool_result":
                if block.get("tool_use_id") not in calls:
                    return (
                        f"messages.{m}.content.{b}: unexpected `tool_use_id` found in "
                        f"`tool_result` blocks: {block.get('tool_use_id')}. Each `tool_result` "
                        "block must have a corresponding `tool_use` block in the previous message."
                    )
                if b == results:
                    results += 1
        if calls and results < len(calls):
            return (
                f"messages.{m}: Did not find {len(calls)} tool_result block(s) at the beginning "
                "of this message. Messages following tool_use blocks must begin with a matching "
                "number of tool_result blocks."
            )
        calls = [str(block.get("id")) for block in blocks if block.get("type") == "tool_use"]
        places += [(f"messages.{m}.content.{b}", block) for b, block in enumerate(blocks)]
    for where, block in places:
        if block.get("type") == "text":
            text = block.get("text")
            if not text:
                return f"{where.split('.')[0]}: text content blocks must be non-empty"
            if not str(text).strip():
                return (
                    f"{where.split('.')[0]}: text content blocks must contain non-whitespace text"
                )
        if isinstance(block.get("cache_control"), dict):
            marks.append(block["cache_control"].get("ttl", "5m"))
    if len(marks) > MAX_BREAKPOINTS:
        return (
            f"A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided. "
            f"Found {len(marks)}."
        )
    if "5m" in marks and "1h" in marks[marks.index("5m") :]:
        return (
            "a ttl='1h' cache_control block must not come after a ttl='5m' cache_control "
            "block. Note that blocks are processed in the following order: `tools`, `system`, "
            "`messages`."
        )
    return None
