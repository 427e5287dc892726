"""The Anthropic Messages API (``POST /v1/messages``) to and from the Gateway's messages.

The Gateway's contract follows the Messages API one to one, so a request maps field by field:
content blocks (text, tool_use, tool_result) with their ``cache_control`` breakpoints, system
blocks, tools, ``tool_choice``; a top-level ``cache_control`` (automatic caching) marks the
last block. Fields the Gateway cannot honour (images, stop sequences, one tool call at a time,
extended thinking, thinking turned off for a model that thinks by default, top_k, a top_p but
1) are refused with a 400 that says so, never dropped silently.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cachemesh.v1 import gateway_pb2 as pb
from services.common.models import AUTO
from services.http_front.errors import invalid
from services.http_front.fields import (
    GATEWAY_PATH,
    SAMPLING,
    Obj,
    answered_input,
    default_only,
    json_text,
    role_names,
    shown,
    unquoted,
    unsupported,
)
from services.router.validation import MAX_BREAKPOINTS, breakpoints

# anthropic-version: Anthropic's API versions (its "Versions" page), oldest first. Anthropic
# refuses any other value with a 400 (``anthropic-version: "2023-10-01" is not a valid
# version``), so does the front up to the newest (``admission.AnthropicVersions``): a date taken
# here and refused there hid a caller's typo until it met the real API. A date after the newest
# is a client newer than the front: served as the newest (refusing it would refuse every request
# of that client). 2026-10-21 is what the SDKs' majors since that day send (anthropic 2.x).
VERSIONS = ("2023-01-01", "2023-06-01", "2026-10-21")
# from 2026-10-21 on, Anthropic refuses the sampling parameters, at their default values too,
# as fields it does not know (``temperature: Extra inputs are not permitted``; its SDKs' majors
# since then have none); the versions before take them
NO_SAMPLING_SINCE = "2026-10-21"
_SAMPLING = ("temperature", "top_p", "top_k")
_TOP = (
    "model", "messages", "max_tokens", "system", "tools", "temperature", "stream", "metadata",
    "stop_sequences", "top_p", "top_k", "tool_choice", "thinking", "service_tier", "cache_control",
)  # fmt: skip
# the Messages API's service tiers: cachemesh has no Priority Tier, so each is the standard one
_SERVICE_TIERS = ("auto", "standard_only")
_TTL = {"5m": pb.CACHE_TTL_5M, "1h": pb.CACHE_TTL_1H}
_ROLES = {"user": pb.ROLE_USER, "assistant": pb.ROLE_ASSISTANT}
# every stop_reason of the Messages API (the SDK's StopReason); an unknown one reads as end_turn
_STOP = {
    "end_turn",
    "max_tokens",
    "tool_use",
    "stop_sequence",
    "pause_turn",
    "refusal",
    "model_context_window_exceeded",
}


def parse_request(
    body: dict[str, Any],
    *,
    version: str = VERSIONS[-1],
    thinks_by_default: Collection[str] = (),
    kept: list[Turn] | None = None,
) -> tuple[pb.CompleteRequest, bool]:
    """The Gateway request for a Messages body, and whether it asks for a stream.
    ``version``: the ``anthropic-version`` it is served as (``AnthropicVersions.served``), the
    newest unless told. ``thinks_by_default``: the models (and ``auto``, when it may pick one)
    that think unless told not to, whose thinking cachemesh cannot turn off. ``kept``, if
    given, gets where each Gateway message came from in the caller's (``Turn``:
    ``_empty_answer`` drops some, and consecutive turns of a role are one: ``at_caller``)."""
    top = Obj(body, "")
    sampling = version < NO_SAMPLING_SINCE  # ISO dates: their order is the strings' order
    top.only(_TOP if sampling else tuple(f for f in _TOP if f not in _SAMPLING))
    request = pb.CompleteRequest(model=top.text("model", required=True) or "")
    max_tokens = top.integer("max_tokens", required=True)
    request.max_tokens = _int32(max_tokens or 0, "max_tokens")
    temperature = top.number("temperature")
    if temperature is not None:
        if not 0.0 <= temperature <= 1.0:  # the Messages API's range, whatever the model
            raise invalid(f"temperature: must be within [0, 1], got {temperature}", "temperature")
        request.temperature = temperature
    _unsupported(top)
    _thinking(top, request.model, thinks_by_default)
    system = top.raw("system")
    if isinstance(system, str):
        if system:
            request.system.append(pb.ContentBlock(text=system))
    elif system is not None:
        blocks = top.array("system") or []
        for i, raw in enumerate(blocks):
            block = _block(raw, f"system.{i}")
            if block.WhichOneof("kind") != "text":
                raise invalid(f"system.{i}.type: system blocks must be text", f"system.{i}")
            request.system.append(block)
    for i, raw in enumerate(top.array("tools") or []):
        request.tools.append(_tool(raw, f"tools.{i}"))
    _tool_choice(top, request)
    raw_messages = top.array("messages", required=True) or []
    turns = kept if kept is not None else []
    for i, raw in enumerate(raw_messages):
        message = _message(raw, f"messages.{i}")
        if _empty_answer(message, f"messages.{i}"):
            continue
        if not message.content:  # a user's: refused before ``_join`` could merge it away
            raise invalid(
                f"messages.{i}.content: a message needs at least one block (the API's \"all "
                "messages must have non-empty content except for the optional final assistant "
                'message")',
                f"messages.{i}.content",
            )
        _join(request, turns, message, i)
    if raw_messages and not request.messages:  # each one dropped, the first named
        only = "the only message" if len(raw_messages) == 1 else "each message"
        raise invalid(
            f"messages.0: {only} is an empty assistant answer (no block, or text blocks of "
            "whitespace only), which is no turn: the request has no user message; send at "
            "least one user message",
            "messages.0",
        )
    automatic = cache_control(top)
    if automatic is not None:
        _mark_last_block(request, automatic, turns)
    return request, bool(top.flag("stream"))


@dataclass
class Turn:
    """Where one of the Gateway request's messages came from: the caller's messages it holds
    (their indices), and each of its blocks' caller's message and block index."""

    messages: list[int]
    blocks: list[tuple[int, int]] = field(default_factory=list)


def _join(request: pb.CompleteRequest, turns: list[Turn], message: pb.Message, i: int) -> None:
    """The caller's message ``i`` into ``request``: a turn of its own, or, after a turn of
    the same role, that turn's blocks, as the Messages API combines consecutive user or
    assistant turns into one ("Consecutive user or assistant turns in your request will be
    combined into a single turn"). Two user messages in a row (as an empty answer dropped
    between them leaves them) were two Gateway turns: the model of an OpenAI or self-hosted
    row saw two user turns where Anthropic's sees one, and the cache's prefix differed from
    the same conversation's through the OpenAI front (its ``_turn`` joins them too)."""
    if request.messages and request.messages[-1].role == message.role:
        joined = request.messages[-1]
        turns[-1].messages.append(i)
    else:
        joined = request.messages.add()
        joined.role = message.role
        turns.append(Turn([i]))
    turns[-1].blocks += [(i, j) for j in range(len(message.content))]
    joined.content.extend(message.content)


def _empty_answer(message: pb.Message, path: str) -> bool:
    """Whether ``message`` is an assistant answer the model left empty, which says nothing and
    is no Gateway turn: no block (``content: []``, the front's own empty answer, streamed or
    not) or text blocks of whitespace only (``""``, or the ``" "`` the front returns for a
    whitespace-only runaway). Dropped wherever it is: a client sending back the history it got
    sends these, and each was the Gateway's 400 ("a message needs at least one block", "text
    blocks must not be empty") with no next step. The API refuses them but as the last message
    ("all messages must have non-empty content except for the optional final assistant
    message", anthropics/claude-code#6774; "text content blocks must be non-empty"): the front
    is looser, as its OpenAI side (``openai_api._assistant``), since it returns them. The user
    messages around one are one Gateway turn, as the API combines consecutive turns of a
    role, and so does the front (``_join``). A breakpoint on such a block is a 400 naming it
    (it marks nothing kept), not dropped."""
    if message.role != pb.ROLE_ASSISTANT:
        return False
    if any(b.WhichOneof("kind") != "text" or b.text.strip() for b in message.content):
        return False
    for j, block in enumerate(message.content):
        if block.HasField("cache_control"):
            where = f"{path}.content.{j}.cache_control"
            raise invalid(
                f"{where}: a cache breakpoint on an empty text block marks nothing the Gateway "
                "keeps; put it on a block with text",
                where,
            )
    return True


def _mark_last_block(
    request: pb.CompleteRequest, control: pb.CacheControl, turns: Sequence[Turn]
) -> None:
    """Automatic caching (a top-level ``cache_control``): the breakpoint goes on the request's
    last cacheable block (tools, system, messages in that order), as the API places it. A block
    marked already with the same TTL keeps its one breakpoint (a no-op); with another TTL the
    request is refused, as the API refuses it (prompt caching docs, automatic caching, edge
    cases: "the API returns a 400 error")."""
    last, where = _last_block(request, turns)
    if last is None:
        return
    if last.HasField("cache_control"):
        kept = _ttl_name(last.cache_control)
        if kept != _ttl_name(control):
            raise invalid(
                f"cache_control: automatic caching puts a {_ttl_name(control)!r} breakpoint on "
                f"the request's last block, which has its own of another TTL "
                f"({where}.cache_control: {kept!r}); the API refuses the two: give them the "
                "same ttl, or remove one of them",
                "cache_control",
            )
        return
    if len(breakpoints(request)) >= MAX_BREAKPOINTS:
        raise invalid(
            f"cache_control: automatic caching puts a breakpoint on the request's last block, "
            f"and its blocks already hold {MAX_BREAKPOINTS} (the most a request may have): "
            "remove one of them, or the top-level cache_control",
            "cache_control",
        )
    last.cache_control.CopyFrom(control)


def _last_block(
    request: pb.CompleteRequest, turns: Sequence[Turn]
) -> tuple[pb.ContentBlock | pb.Tool | None, str]:
    """The request's last cacheable block and its field, as the caller named it (``turns``):
    tools, system, messages order."""
    for m in range(len(request.messages) - 1, -1, -1):
        content = request.messages[m].content
        if content:
            i, j = turns[m].blocks[-1]
            return content[-1], f"messages.{i}.content.{j}"
    if request.system:
        return request.system[-1], f"system.{len(request.system) - 1}"
    if request.tools:
        return request.tools[-1], f"tools.{len(request.tools) - 1}"
    return None, ""


def _ttl_name(control: pb.CacheControl) -> str:
    return "1h" if control.ttl == pb.CACHE_TTL_1H else "5m"


def _int32(value: int, where: str) -> int:
    if not -(2**31) <= value < 2**31:
        raise invalid(f"{where}: {value} is out of range", where)
    return value


_CHOICES = {  # "auto" is left unset: see _tool_choice
    "auto": pb.ToolChoice.MODE_UNSPECIFIED,
    "any": pb.ToolChoice.MODE_ANY,
    "tool": pb.ToolChoice.MODE_TOOL,
    "none": pb.ToolChoice.MODE_NONE,
}


def _tool_choice(top: Obj, request: pb.CompleteRequest) -> None:
    """The Messages API's ``tool_choice`` (``{"type": "auto" | "any" | "tool" | "none"}``, a
    ``name`` with ``tool``) as the Gateway's; each type's fields as the API takes them.
    ``disable_parallel_tool_use: true`` stays refused (cachemesh cannot hold a model to one
    call). ``auto`` (with ``disable_parallel_tool_use: false`` or without it) leaves the
    Gateway's field unset, as an omitted choice does: the two are one request, byte for byte
    (the router's idempotency fingerprint, the answer ledger's, L1's recent-query key), so a
    retry sending one where the first attempt sent the other is the same request."""
    choice = top.obj("tool_choice")
    if choice is None:
        return
    kind = choice.text("type", required=True)
    if kind not in _CHOICES:
        raise invalid(
            f"tool_choice.type: {shown(choice.raw('type'))} is not a tool choice; send 'auto', "
            "'any', 'tool' or 'none'",
            "tool_choice.type",
        )
    fields = {"none": ("type",), "tool": ("type", "name", "disable_parallel_tool_use")}
    choice.only(fields.get(kind, ("type", "disable_parallel_tool_use")))
    if choice.flag("disable_parallel_tool_use"):
        raise unsupported(
            choice.at("disable_parallel_tool_use"),
            "a model may answer with several tool calls; cachemesh cannot hold it to one",
            "omit it or send false",
        )
    if kind == "auto":
        return
    request.tool_choice.mode = _CHOICES[kind]
    if kind == "tool":
        name = choice.text("name", required=True) or ""
        if name not in {tool.name for tool in request.tools}:
            raise invalid(
                f"tool_choice.name: {shown(name)} is not the name of one of the request's "
                "tools; name one of them",
                "tool_choice.name",
            )
        request.tool_choice.name = name
    elif kind == "any" and not request.tools:
        raise invalid(
            "tool_choice.type: 'any' needs tools: send tools, or omit tool_choice",
            "tool_choice.type",
        )


def _unsupported(top: Obj) -> None:
    stops = top.array("stop_sequences")
    if stops:
        raise unsupported(
            "stop_sequences",
            "the Gateway passes on no stop sequence: an answer ends where the model ends it",
            "omit it and cut the answer at the sequence yourself",
        )
    default_only(top, "top_p", 1, SAMPLING)  # 1 changes nothing
    if top.has("top_k"):
        top.integer("top_k")
        raise unsupported("top_k", SAMPLING)
    metadata = top.obj("metadata")
    if metadata is not None:
        metadata.only(("user_id",))
        metadata.text("user_id")
    tier = top.text("service_tier")
    if tier is not None and tier not in _SERVICE_TIERS:  # both mean the standard tier here
        raise invalid(
            f"service_tier: must be 'auto' or 'standard_only', got {shown(tier)} (cachemesh "
            "answers and bills every request at the standard tier)"
        )


def _thinking(top: Obj, model: str, thinks_by_default: Collection[str]) -> None:
    """Extended thinking is refused; ``disabled`` is accepted where it is the model's default
    (nothing is dropped) and refused where the model thinks anyway: the Gateway has no
    thinking field, so the model would think, and bill its thinking as output, all the same."""
    thinking = top.obj("thinking")
    if thinking is None:
        return
    kind = thinking.text("type", required=True)
    if kind != "disabled":
        raise invalid(
            "thinking: extended thinking is not supported by cachemesh (the Gateway has no "
            "thinking field); omit it",
            "thinking",
        )
    if model in thinks_by_default:
        which = "may pick a model that thinks" if model == AUTO else "thinks"
        where = thinking.at("type")
        raise invalid(
            f"{where}: 'disabled' is not supported by cachemesh for {model}, which {which} by "
            "default: cachemesh cannot turn its thinking off (it would think, and bill its "
            "thinking as output tokens, all the same); omit thinking, or pick a model that "
            "does not think by default",
            where,
        )


def cache_control(obj: Obj) -> pb.CacheControl | None:
    control = obj.obj("cache_control")
    if control is None:
        return None
    control.only(("type", "ttl"))
    kind = control.text("type", required=True)
    if kind != "ephemeral":
        raise invalid(f"{control.at('type')}: must be 'ephemeral', got {shown(kind)}")
    ttl = control.text("ttl")
    if ttl is None:
        return pb.CacheControl()
    if ttl not in _TTL:
        raise invalid(f"{control.at('ttl')}: must be '5m' or '1h', got {shown(ttl)}")
    return pb.CacheControl(ttl=_TTL[ttl])


def _block(raw: object, path: str) -> pb.ContentBlock:
    obj = Obj(raw, path)
    kind = obj.text("type", required=True)
    block = pb.ContentBlock()
    nested: list[pb.CacheControl] = []  # a tool result's parts' breakpoints
    if kind == "text":
        obj.only(("type", "text", "cache_control", "citations"))
        block.text = obj.text("text", required=True) or ""
    elif kind == "tool_use":
        # `caller` and `toolset_name` are in the API's schema (the SDK echoes them back, null,
        # when a response's content is sent again); cachemesh serves only direct calls
        obj.only(("type", "id", "name", "input", "cache_control", "caller", "toolset_name"))
        for name in ("caller", "toolset_name"):
            if obj.has(name):
                raise invalid(
                    f"{obj.at(name)}: programmatic and MCP toolset calls are not supported by "
                    "cachemesh; send direct tool calls"
                )
        block.tool_use.id = obj.text("id", required=True) or ""
        block.tool_use.name = obj.text("name", required=True) or ""
        block.tool_use.input_json = json_text(obj.raw("input"), obj.at("input"))
    elif kind == "tool_result":
        obj.only(("type", "tool_use_id", "content", "is_error", "cache_control"))
        block.tool_result.tool_use_id = obj.text("tool_use_id", required=True) or ""
        parts = _result_parts(obj)
        block.tool_result.content = "\n".join(part.text for part in parts)
        block.tool_result.is_error = bool(obj.flag("is_error"))
        # the Gateway's tool result is one text: a breakpoint on its last part marks the
        # prefix through the whole result; one on an earlier part cannot be kept where it is
        _only_last_part_marked(obj, parts)
        nested = parts_controls(parts)
    else:
        raise invalid(
            f"{obj.at('type')}: {shown(kind)} blocks are not supported by cachemesh; "
            "use text, tool_use or tool_result"
        )
    control = longest(cache_control(obj), *nested)
    if control is not None:
        block.cache_control.CopyFrom(control)
    return block


def _result_parts(obj: Obj) -> list[pb.ContentBlock]:
    """A tool result's content: a string, or text blocks (each may carry a breakpoint)."""
    content = obj.raw("content")
    if content is None or isinstance(content, str):
        return [pb.ContentBlock(text=content or "")]
    parts = []
    for i, raw in enumerate(obj.array("content") or []):
        part = _block(raw, f"{obj.at('content')}.{i}")
        if part.WhichOneof("kind") != "text":
            raise invalid(f"{obj.at('content')}.{i}: a tool result holds text blocks")
        parts.append(part)
    return parts


def _only_last_part_marked(obj: Obj, parts: list[pb.ContentBlock]) -> None:
    """Anthropic caches the prefix through a marked part of a tool result's content and counts
    each marked part as a breakpoint; cachemesh holds a tool result as one text, so a
    breakpoint on a part before its last would move to the result's end: refused."""
    for i, part in enumerate(parts[:-1]):
        if part.HasField("cache_control"):
            where = f"{obj.at('content')}.{i}"
            last = f"{obj.at('content')}.{len(parts) - 1}"
            raise invalid(
                f"{where}.cache_control: cachemesh holds a tool result as one text, so a "
                "breakpoint inside it must be on its last part (it caches the prefix through "
                f"the whole result); move it to {last}, or onto the tool_result itself, or "
                "join the parts it should cover into one",
                where,
            )


def parts_controls(parts: list[pb.ContentBlock]) -> list[pb.CacheControl]:
    return [part.cache_control for part in parts if part.HasField("cache_control")]


def longest(*controls: pb.CacheControl | None) -> pb.CacheControl | None:
    """Of ``controls``, the breakpoint that keeps its prefix cached longest (1h over 5m)."""
    given = [c for c in controls if c is not None]
    if not given:
        return None
    return max(given, key=lambda c: c.ttl == pb.CACHE_TTL_1H)


def _message(raw: object, path: str) -> pb.Message:
    obj = Obj(raw, path)
    obj.only(("role", "content"))
    role = obj.text("role", required=True)
    if role not in _ROLES:
        raise invalid(f"{obj.at('role')}: must be 'user' or 'assistant', got {shown(role)}")
    message = pb.Message(role=_ROLES[role])
    content = obj.raw("content")
    if isinstance(content, str):
        message.content.append(pb.ContentBlock(text=content))
        return message
    for i, part in enumerate(obj.array("content", required=True) or []):
        message.content.append(_block(part, f"{obj.at('content')}.{i}"))
    return message


def _tool(raw: object, path: str) -> pb.Tool:
    obj = Obj(raw, path)
    obj.only(("name", "description", "input_schema", "cache_control", "type"))
    kind = obj.text("type")
    if kind not in (None, "custom"):
        raise invalid(f"{obj.at('type')}: server tools ({shown(kind)}) are not supported")
    tool = pb.Tool(
        name=obj.text("name", required=True) or "",
        description=obj.text("description") or "",
        input_schema_json=json_text(obj.raw("input_schema"), obj.at("input_schema")),
    )
    control = cache_control(obj)
    if control is not None:
        tool.cache_control.CopyFrom(control)
    return tool


# --- the Gateway's refusals -------------------------------------------------------------------

# The Gateway's names of fields the Messages API names otherwise (the JSON text it carries a
# tool's schema and a tool call's input in), where one begins a path's rest
_BLOCK_FIELDS: Mapping[str, str] = {".tool_use.input_json": ".tool_use.input"}
_TOOL_FIELDS: Mapping[str, str] = {".input_schema_json": ".input_schema"}


def _renamed(rest: str, fields: Mapping[str, str]) -> str:
    for gateway, caller in fields.items():
        if rest == gateway or rest.startswith(f"{gateway}."):
            return f"{caller}{rest[len(gateway) :]}"
    return rest


def _dotted(found: re.Match[str], kept: Sequence[Turn]) -> str:
    """A Gateway path (``fields.GATEWAY_PATH``) as the Messages API writes one, its message
    and block indices the caller's (``kept``)."""
    turn, block, system, tool, rest = found.groups()
    if tool is not None:
        return f"tools.{tool}{_renamed(rest, _TOOL_FIELDS)}"
    if system is not None:
        return f"system.{system}{rest}"
    i = int(turn)
    held = kept[i] if i < len(kept) else Turn([i])  # no message of the request: as said
    if block is not None:
        j = int(block)
        at, part = held.blocks[j] if j < len(held.blocks) else (held.messages[0], j)
        return f"messages.{at}.content.{part}{_renamed(rest, _BLOCK_FIELDS)}"
    if rest or len(held.messages) == 1:
        return f"messages.{held.messages[0]}{rest}"
    return f"messages.{held.messages[0]} to messages.{held.messages[-1]}"  # the turn's


def at_caller(message: str, kept: Sequence[Turn] = ()) -> str:
    """A Gateway refusal's ``message`` naming fields as the Messages API does: its paths
    ``messages.1.content.0.tool_use.id``, ``tools.0.input_schema`` (Anthropic's own 400s,
    and this front's), not the Gateway's ``messages[1].content[0]`` (Chat Completions' form,
    which an Anthropic SDK user never meets), and its roles ``"role": "user"``, not the
    Gateway's enum's ``ROLE_USER``. A system block and a tool keep their index (a string is
    its field's one block, ``.0``); a message and a block are named by the caller's indices
    (``kept``, from ``parse_request``: the empty assistant answers ``_empty_answer`` dropped
    are no Gateway message, and consecutive turns of a role are one). The rest of the
    message, every value it quotes (the caller's own: a tool named 'messages[0]') and a
    provider's words it passes on (``unquoted``) are kept as the Gateway said them."""

    def caller_words(part: str) -> str:
        return role_names(GATEWAY_PATH.sub(lambda m: _dotted(m, kept), part), "anthropic")

    return unquoted(message, caller_words)


# --- answers ---------------------------------------------------------------------------------


def message_id(request_id: str) -> str:
    return f"msg_{request_id}"


def usage(u: pb.Usage) -> dict[str, Any]:
    """The Messages API's usage; of the output, the thinking's tokens
    (``output_tokens_details.thinking_tokens``, which the SDKs read) when the provider
    reported any (``reasoning_tokens``; 0: none reported, so none claimed)."""
    served: dict[str, Any] = {
        "input_tokens": u.input_tokens,
        "cache_creation_input_tokens": u.cache_creation_input_tokens,
        "cache_read_input_tokens": u.cache_read_input_tokens,
        "cache_creation": {
            "ephemeral_5m_input_tokens": u.cache_creation.ephemeral_5m_input_tokens,
            "ephemeral_1h_input_tokens": u.cache_creation.ephemeral_1h_input_tokens,
        },
        "output_tokens": u.output_tokens,
    }
    if u.reasoning_tokens:
        served["output_tokens_details"] = {"thinking_tokens": u.reasoning_tokens}
    return served


def content_block(block: pb.ContentBlock) -> dict[str, Any]:
    kind = block.WhichOneof("kind")
    if kind == "tool_use":
        use = block.tool_use
        return {
            "type": "tool_use",
            "id": use.id,
            "name": use.name,
            "input": answered_input(use.input_json)[0],
        }
    return {"type": "text", "text": block.text}


def stop_reason(value: str) -> str:
    return value if value in _STOP else "end_turn"


def response(end: pb.CompleteResponse) -> dict[str, Any]:
    return {
        "id": message_id(end.request_id),
        "type": "message",
        "role": "assistant",
        "model": end.model,
        "content": [content_block(block) for block in end.content],
        "stop_reason": stop_reason(end.stop_reason),
        "stop_sequence": None,
        "usage": usage(end.usage),
    }


Event = tuple[str, dict[str, Any]]


class EventStream:
    """The Gateway's chunks as Messages streaming events, in Anthropic's order: message_start,
    (content_block_start, content_block_delta..., content_block_stop) per block, message_delta
    with the usage, message_stop."""

    def __init__(self) -> None:
        self._index = -1
        self._open: str | None = None  # the kind of the block open at _index

    def start(self, start: pb.CompleteResponse) -> list[Event]:
        message: dict[str, Any] = {
            "id": message_id(start.request_id),
            "type": "message",
            "role": "assistant",
            "model": start.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            # the start's usage is the estimate made before the answer: message_delta's, the
            # bill, corrects its counts in the SDKs' final message, but not the write's split
            # by TTL (their accumulators leave ``cache_creation`` as message_start left it), so
            # none is claimed here; message_delta carries the billed split
            "usage": usage(start.usage) | {"cache_creation": None},
        }
        return [("message_start", {"type": "message_start", "message": message})]

    def delta(self, block: pb.ContentBlock) -> list[Event]:
        kind = block.WhichOneof("kind")
        events: list[Event] = []
        if kind == "text":
            if self._open != "text":
                events += self._close()
                events.append(self._begin("text", {"type": "text", "text": ""}))
            events.append(self._delta({"type": "text_delta", "text": block.text}))
        elif kind == "tool_use":
            events += self._close()
            use = block.tool_use
            head = {"type": "tool_use", "id": use.id, "name": use.name, "input": {}}
            events.append(self._begin("tool_use", head))
            text = answered_input(use.input_json)[1]
            events.append(self._delta({"type": "input_json_delta", "partial_json": text}))
            events += self._close()
        return events

    def end(self, end: pb.CompleteResponse, facts: dict[str, object]) -> list[Event]:
        events = self._close()
        delta = {"stop_reason": stop_reason(end.stop_reason), "stop_sequence": None}
        events.append(
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": delta,
                    "usage": usage(end.usage),
                    "cachemesh": facts,
                },
            )
        )
        events.append(("message_stop", {"type": "message_stop"}))
        return events

    def _begin(self, kind: str, head: dict[str, Any]) -> Event:
        self._index += 1
        self._open = kind
        return (
            "content_block_start",
            {"type": "content_block_start", "index": self._index, "content_block": head},
        )

    def _delta(self, delta: dict[str, Any]) -> Event:
        return (
            "content_block_delta",
            {"type": "content_block_delta", "index": self._index, "delta": delta},
        )

    def _close(self) -> list[Event]:
        if self._open is None:
            return []
        self._open = None
        return [("content_block_stop", {"type": "content_block_stop", "index": self._index})]


PING: Event = ("ping", {"type": "ping"})
