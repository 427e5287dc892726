"""The OpenAI Chat Completions API (``POST /v1/chat/completions``) to and from the Gateway.

system and developer messages become the Gateway's system blocks, in order, wherever the
caller put them (one after the conversation began is hoisted there, as Anthropic's OpenAI SDK
compatibility layer does: Aider and AutoGen's GroupChat send one last), unless that would
leave an assistant message last, a prefill the caller did not send (``late_system``); an assistant
message's ``tool_calls`` become tool_use blocks and ``tool`` messages tool_result blocks of a
user turn.
OpenAI caches prompt prefixes by itself, so a plain request carries no breakpoints and what
the Gateway bills follows the requested model's rules; for models billed under Anthropic's
rules (the simulated ones) a text part may carry ``cache_control`` (as the LiteLLM and
OpenRouter proxies accept it), which marks a breakpoint there, and the cache read shows in
``prompt_tokens_details.cached_tokens``. ``tool_choice`` maps to the Gateway's (``required`` is
its ANY). Fields the Gateway cannot honour (n > 1, stop, logprobs, parallel_tool_calls false,
structured output, images, a sampling setting but temperature, a seed, logit_bias,
reasoning_effort, a service tier but the standard one, verbosity, audio, a predicted output,
moderation, web search, a prompt cache retention, the deprecated functions) are refused with a
400 saying so, never dropped silently; at the value that changes nothing (top_p 1, no penalty,
no bias, modalities ["text"]) they are accepted.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cachemesh.v1 import gateway_pb2 as pb
from services.common.models import AUTO
from services.common.strict_json import NotStandardJson
from services.common.strict_json import loads as strict_loads
from services.http_front.anthropic_api import cache_control
from services.http_front.errors import ApiError, invalid
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
from services.http_front.late_system import late_system_refusal

# Chat Completions arguments (the SDK's own) the Gateway has no place for: each refused with
# why and what to send instead. Before, each was "Extra inputs are not permitted", the words of
# a field the API does not have (10 of 10 of the SDK's arguments the front did not name).
_NOT_CARRIED: tuple[tuple[str, tuple[str, str]], ...] = (
    ("audio", ("cachemesh answers with text only", "omit it")),
    ("functions", ("the deprecated functions", "declare them in tools")),
    ("function_call", ("the deprecated function_call", "use tools and tool_choice")),
    ("moderation", ("the Gateway runs no moderation of the request or the answer", "omit it")),
    ("prediction", ("the Gateway passes on no predicted output", "omit it")),
    ("prompt_cache_options", _CACHE_SET_UP := (
        "how long a provider keeps a cached prompt is set per model by the operator, in the "
        "model table's prompt_cache_retention", "omit it",
    )),
    ("prompt_cache_retention", _CACHE_SET_UP),
    ("verbosity", ("the Gateway has no verbosity setting; each model answers its way",
                   "omit it and ask for a shorter or longer answer in the prompt")),
    ("web_search_options", ("the Gateway runs no web search", "omit it")),
)  # fmt: skip
_TOP = (
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "stream",
    "stream_options", "tools", "tool_choice", "parallel_tool_calls", "n", "stop", "user",
    "seed", "top_p", "frequency_penalty", "presence_penalty", "logprobs", "top_logprobs",
    "logit_bias", "response_format", "metadata", "store", "service_tier", "prompt_cache_key",
    "reasoning_effort", "safety_identifier", *(name for name, _ in _NOT_CARRIED), "modalities",
)  # fmt: skip
# an assistant message as the caller wrote it, or as the SDK returned it in an answer (an
# application appends ``completion.choices[0].message`` to its history and sends it back)
_ASSISTANT = (
    "role", "content", "name", "tool_calls", "refusal", "annotations", "audio", "function_call",
    "parsed",
)  # fmt: skip
# the Gateway's stop reasons as OpenAI finish reasons (a refusal: the content filter's); any
# other reads as stop
_FINISH = {
    "end_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


def parse_request(
    body: dict[str, Any],
    default_max_tokens: int,
    origins: Origins | None = None,
    *,
    thinks_by_default: Collection[str] = (),
) -> tuple[pb.CompleteRequest, bool, bool]:
    """The Gateway request, whether to stream, and whether the stream ends with the usage.
    ``origins``, when given, gets where in the caller's request each of the Gateway request's
    blocks came from (``at_caller``). ``thinks_by_default``: the models (and ``auto``, when it
    may pick one) that think unless told not to, whose limit counts their thinking."""
    top = Obj(body, "")
    top.only(_TOP)
    kept = Origins() if origins is None else origins
    request = pb.CompleteRequest(model=top.text("model", required=True) or "")
    limit, kept.max_tokens = _output_limit(top)
    if kept.max_tokens == "max_tokens" and request.model in thinks_by_default:
        raise _legacy_limit(request.model)
    limit = default_max_tokens if limit is None else limit
    if not -(2**31) <= limit < 2**31:
        where = kept.max_tokens or "max_tokens"
        raise invalid(f"{where}: {limit} is out of range", where)
    request.max_tokens = limit
    temperature = top.number("temperature")
    if temperature is not None:
        request.temperature = temperature
    _unsupported(top)
    key = top.text("prompt_cache_key")
    if key:
        request.cache.prompt_cache_key = key
    for i, raw in enumerate(top.array("tools") or []):
        request.tools.append(_tool(raw, f"tools[{i}]"))
    _tool_choice(top, request)
    raw_messages = top.array("messages", required=True) or []
    dropped = _messages(raw_messages, request, kept)
    if not request.messages and dropped:
        raise invalid(
            f"{dropped[0]}: an empty assistant answer (no text, no refusal, no tool_calls) is "
            "not a turn, and the request has no user message; send at least one user message",
            dropped[0],
        )
    if refusal := late_system_refusal(raw_messages):
        raise refusal
    stream = bool(top.flag("stream"))
    options = top.obj("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise invalid("stream_options: only allowed when stream is true", "stream_options")
        options.only(("include_usage", "include_obfuscation"))
        include_usage = bool(options.flag("include_usage"))
        options.flag("include_obfuscation")
    return request, stream, include_usage


def _output_limit(top: Obj) -> tuple[int | None, str | None]:
    """The caller's output limit and the field it set it by, ``max_completion_tokens`` or the
    deprecated ``max_tokens`` (None, None: neither). Both at once is a 400, as OpenAI answers
    it (before, the front took ``max_completion_tokens`` and dropped ``max_tokens`` unsaid: a
    caller's ``max_tokens: 7`` with ``max_completion_tokens: 9`` was answered and billed up to
    9 tokens)."""
    completion = top.integer("max_completion_tokens")
    legacy = top.integer("max_tokens")
    if completion is not None and legacy is not None:
        raise invalid(
            "max_tokens: setting 'max_tokens' and 'max_completion_tokens' at the same time is "
            "not supported; send max_completion_tokens alone (max_tokens is deprecated)",
            "max_tokens",
            "invalid_parameter_combination",  # OpenAI's code for it
        )
    if completion is not None:
        return completion, "max_completion_tokens"
    return legacy, None if legacy is None else "max_tokens"


def _legacy_limit(model: str) -> ApiError:
    """The deprecated ``max_tokens`` to a model that thinks by default: it counted the
    answer's tokens alone, while such a model's limit counts its thinking too (OpenAI refuses
    it for its reasoning models). Before, it was sent as ``max_completion_tokens``: a
    ``max_tokens: 300`` meant for the answer was spent on the thinking, the answer cut or
    empty and billed."""
    which = "may pick a model that thinks" if model == AUTO else "thinks"
    return invalid(
        f"max_tokens: not supported by cachemesh for {model}, which {which} by default: its "
        "limit counts its thinking too, and max_tokens (deprecated) counts the answer alone; "
        "send max_completion_tokens, the limit of the thinking and the answer together",
        "max_tokens",
        "unsupported_parameter",  # OpenAI's code for it to its reasoning models
    )


_MODES = {  # "auto" is left unset: see _tool_choice
    "none": pb.ToolChoice.MODE_NONE,
    "required": pb.ToolChoice.MODE_ANY,
}


def _tool_choice(top: Obj, request: pb.CompleteRequest) -> None:
    """Chat Completions' ``tool_choice`` (``"none" | "auto" | "required"`` or
    ``{"type": "function", "function": {"name": ...}}``) as the Gateway's. A forced choice
    needs tools, as OpenAI says ("'tool_choice' is only allowed when 'tools' are specified");
    ``none`` and ``auto`` without tools are taken (nothing is sent: no tool is called).
    ``auto`` leaves the Gateway's field unset, as an omitted choice does: the two are one
    request, byte for byte (the router's idempotency fingerprint, the answer ledger's, L1's
    recent-query key), so a retry sending one where the first attempt sent the other is the
    same request, not "already used for a different request"."""
    raw = top.raw("tool_choice")
    if raw is None or raw == "auto":
        return
    if not isinstance(raw, str | dict):
        raise top.wrong_type("tool_choice", "a string or an object")
    if isinstance(raw, str):
        if raw not in _MODES:
            raise invalid(
                f"tool_choice: {shown(raw)} is not a tool choice; send 'none', 'auto', "
                '\'required\' or {"type": "function", "function": {"name": ...}}',
                "tool_choice",
            )
        request.tool_choice.mode = _MODES[raw]
        if raw == "required" and not request.tools:
            raise invalid(
                "tool_choice: 'required' is only allowed when 'tools' are specified",
                "tool_choice",
            )
        return
    choice = top.obj("tool_choice")
    assert choice is not None  # not None, not a string: an object or a 400 naming it
    kind = choice.text("type", required=True)
    if kind != "function":
        raise invalid(
            f"tool_choice.type: {shown(choice.raw('type'))} is not supported by cachemesh; "
            'name a function tool: {"type": "function", "function": {"name": ...}}',
            "tool_choice.type",
        )
    choice.only(("type", "function"))
    function = choice.obj("function", required=True)
    assert function is not None
    function.only(("name",))
    name = function.text("name", required=True) or ""
    if name not in {tool.name for tool in request.tools}:
        raise invalid(
            f"tool_choice.function.name: {shown(name)} is not the name of one of the "
            "request's tools; name one of them",
            "tool_choice.function.name",
        )
    request.tool_choice.mode = pb.ToolChoice.MODE_TOOL
    request.tool_choice.name = name


def _unsupported(top: Obj) -> None:
    n = top.integer("n")
    if n not in (None, 1):
        raise unsupported(
            "n",
            "it answers one choice per request",
            "omit it or send 1; for more choices, "
            "send the request again with x-cachemesh-semantic: bypass",
        )
    if top.raw("stop") not in (None, [], ""):
        raise unsupported(
            "stop",
            "the Gateway passes on no stop sequence: an answer ends where the model ends it",
            "omit it and cut the answer at the sequence yourself",
        )
    if top.flag("logprobs"):
        raise unsupported("logprobs", "cachemesh answers without logprobs", "omit it or send false")
    fmt = top.obj("response_format")
    if fmt is not None and fmt.text("type") != "text":
        raise unsupported(
            "response_format",
            "structured output: the Gateway cannot hold a model to JSON or to a schema",
            'omit it or send {"type": "text"}, and ask for JSON in the prompt',
        )
    # accepted at the values that change nothing (OpenAI's defaults), else refused
    default_only(top, "top_p", 1, SAMPLING)
    default_only(top, "frequency_penalty", 0, SAMPLING)
    default_only(top, "presence_penalty", 0, SAMPLING)
    if top.flag("parallel_tool_calls") is False:
        raise unsupported(
            "parallel_tool_calls",
            "a model may answer with several tool calls; cachemesh cannot hold it to one",
            "omit it or send true",
        )
    bias = top.obj("logit_bias")
    if bias is not None and bias.value:
        raise unsupported("logit_bias", "the Gateway has no token biases")
    if top.integer("top_logprobs") not in (None, 0):
        raise unsupported("top_logprobs", "cachemesh answers without logprobs")
    if top.has("seed"):
        raise unsupported("seed", "the Gateway passes on no seed: an answer is not reproducible")
    if top.has("reasoning_effort"):
        raise unsupported(
            "reasoning_effort", "the Gateway has no reasoning setting; each model reasons its way"
        )
    _service_tier(top)
    for name, (why, instead) in _NOT_CARRIED:
        if top.has(name):
            raise unsupported(name, why, instead)
    modalities = top.array("modalities")
    if modalities is not None and modalities != ["text"]:
        raise unsupported(
            "modalities", "cachemesh answers with text only", 'omit it or send ["text"]'
        )
    # what changes no answer: who asks, and OpenAI's own storage
    for name in ("user", "safety_identifier"):
        top.text(name)
    top.flag("store")
    metadata = top.obj("metadata")
    if metadata is not None:
        for name in metadata.value:
            metadata.text(name)


# the service tiers that are OpenAI's standard one (``auto``: the project's default, standard)
_STANDARD_TIERS = ("auto", "default")


def _service_tier(top: Obj) -> None:
    """cachemesh answers and bills every request at the standard tier: ``auto`` and
    ``default`` are served; ``flex`` (half the price at OpenAI), ``priority`` and ``scale``
    would be answered and billed at the standard tier's speed and price, and are refused."""
    tier = top.text("service_tier")
    if tier is not None and tier not in _STANDARD_TIERS:
        raise invalid(
            f"service_tier: {shown(tier)} is not supported by cachemesh (it answers and bills "
            "every request at the standard tier's speed and price); omit it or send 'auto' or "
            "'default'",
            "service_tier",
        )


def _tool(raw: object, path: str) -> pb.Tool:
    obj = Obj(raw, path)
    obj.only(("type", "function"))
    if obj.text("type", required=True) != "function":
        raise invalid(f"{obj.at('type')}: only 'function' tools are supported", obj.at("type"))
    fn = obj.obj("function", required=True)
    assert fn is not None
    fn.only(("name", "description", "parameters", "strict"))
    # accepted (type-checked) and not carried: the Gateway's tools have no strict flag, so no
    # model is held to the schema (the caller's SDK parses the arguments). Refusing it locked
    # out openai's pydantic_function_tool / .parse() with tools and the OpenAI Agents SDK,
    # which send strict: true on every request.
    fn.flag("strict")
    parameters = fn.raw("parameters")
    return pb.Tool(
        name=fn.text("name", required=True) or "",
        description=fn.text("description") or "",
        input_schema_json=json_text(
            {"type": "object", "properties": {}} if parameters is None else parameters,
            fn.at("parameters"),
        ),
    )


def _blocks_of(obj: Obj, *, required: bool = True, refusals: bool = False) -> list[pb.ContentBlock]:
    """A message's content: a string, or an array of text parts (each may carry a
    ``cache_control`` breakpoint), and with ``refusals`` (an assistant's) refusal parts too,
    each the text of what the model said instead (as ``_assistant`` keeps a top-level
    ``refusal``: it was a 400, "'refusal' parts are not supported")."""
    content = obj.raw("content")
    if isinstance(content, str):
        return [pb.ContentBlock(text=content)]
    if content is None and not required:
        return []
    blocks = []
    for i, raw in enumerate(obj.array("content", required=True) or []):
        part = Obj(raw, f"{obj.at('content')}[{i}]")
        kind = part.text("type", required=True)
        if kind == "refusal" and refusals:
            part.only(("type", "refusal"))
            blocks.append(pb.ContentBlock(text=part.text("refusal", required=True) or ""))
            continue
        if kind != "text":
            raise invalid(
                f"{part.at('type')}: {shown(kind)} parts are not supported by cachemesh; use text",
                part.at("type"),
            )
        part.only(("type", "text", "cache_control"))
        block = pb.ContentBlock(text=part.text("text", required=True) or "")
        control = cache_control(part)
        if control is not None:
            block.cache_control.CopyFrom(control)
        blocks.append(block)
    return blocks


def _messages(raw_messages: list[Any], request: pb.CompleteRequest, kept: Origins) -> list[str]:
    """The caller's messages into ``request``; the paths of the empty answers that are no
    Gateway turn (``_assistant``)."""
    dropped: list[str] = []
    for i, raw in enumerate(raw_messages):
        path = f"messages[{i}]"
        obj = Obj(raw, path)
        role = obj.text("role", required=True)
        if role in ("system", "developer"):
            obj.only(("role", "content", "name"))
            _name(obj)
            blocks = _blocks_of(obj)
            request.system.extend(blocks)
            kept.system += _text_origins(obj, range(len(blocks)))
        elif role == "user":
            # ``content: []`` is taken, joined into a user turn beside it, as OpenAI takes an
            # empty content array (openai/openai-python#1812: a 200, not its reference's 400);
            # alone it is the Gateway's "a message needs at least one block"
            obj.only(("role", "content", "name"))
            _name(obj)
            turn = _turn(request, pb.ROLE_USER, kept, path)
            blocks = _blocks_of(obj)
            turn.content.extend(blocks)
            kept.messages[-1].blocks += _text_origins(obj, range(len(blocks)))
        elif role == "assistant":
            obj.only(_ASSISTANT)
            _name(obj)
            said = _assistant(obj)
            if said is None:  # (an empty answer says nothing: no Gateway turn)
                dropped.append(path)
            else:
                blocks, origins = said
                turn = _turn(request, pb.ROLE_ASSISTANT, kept, path)
                turn.content.extend(blocks)
                kept.messages[-1].blocks += origins
        elif role == "tool":
            obj.only(("role", "content", "tool_call_id"))
            parts = _blocks_of(obj)
            result = pb.ToolResult(
                tool_use_id=obj.text("tool_call_id", required=True) or "",
                content="".join(b.text for b in parts),
            )
            block = pb.ContentBlock(tool_result=result)
            # one text in the Gateway: a part's breakpoint marks the prefix through the result
            marks = [j for j, part in enumerate(parts) if part.HasField("cache_control")]
            marked: str | None = None
            if marks:  # the first of the longest, as ``longest`` picks it
                j = max(marks, key=lambda j: parts[j].cache_control.ttl == pb.CACHE_TTL_1H)
                block.cache_control.CopyFrom(parts[j].cache_control)
                marked = f"{path}.content[{j}]"
            _turn(request, pb.ROLE_USER, kept, path).content.append(block)
            kept.messages[-1].blocks.append(Origin(path, _TOOL_RESULT, marked))
        else:
            raise invalid(
                f"{obj.at('role')}: must be system, developer, user, assistant or tool, "
                f"got {shown(role)}",
                obj.at("role"),
            )
    return dropped


def _text_origins(obj: Obj, blocks: Iterable[int]) -> list[Origin]:
    """The caller's path of each of a message's text blocks (``blocks``: their indices among
    its content parts): its ``content`` when that is a string, else each part's (a refusal
    part's text is its ``refusal``)."""
    content = obj.raw("content")
    if isinstance(content, list):
        return [
            Origin(
                f"{obj.at('content')}[{j}]",
                _REFUSAL_PART if _is_refusal(content[j]) else _TEXT_PART,
            )
            for j in blocks
        ]
    return [Origin(obj.at("content"), _TEXT_STRING) for _ in blocks]


def _is_refusal(part: object) -> bool:
    return isinstance(part, dict) and part.get("type") == "refusal"


def _name(obj: Obj) -> None:
    """A participant ``name`` is accepted (a non-string one is a 400) and not carried: the
    Gateway's messages have none, so the model does not see it. Refusing it broke AutoGen
    (a name on every user message) and LangGraph's multi-agent graphs on every request."""
    obj.text("name")


def _turn(request: pb.CompleteRequest, role: int, kept: Origins, path: str) -> pb.Message:
    """The message a block of ``role`` joins: the last one when it has that role (a user turn
    after tool results is one Gateway turn), else a new one; either way the caller's message
    at ``path`` is one of its (``kept``)."""
    if request.messages and request.messages[-1].role == role:
        kept.messages[-1].paths.append(path)
        return request.messages[-1]
    message: pb.Message = request.messages.add()
    message.role = role  # type: ignore[assignment]
    kept.messages.append(_Turn([path]))
    return message


# The Gateway's names of a block's fields, as the caller names them (the longest that begins
# a Gateway path's rest is rewritten; the rest of it kept): a content string is the text
# itself, a text part has its own ``text`` and ``cache_control``, a tool call is a
# ``tool_calls[j]`` (its ``function``), a tool result a ``tool`` message.
_TEXT_STRING: Mapping[str, str] = {".text": ""}
_TEXT_PART: Mapping[str, str] = {}
_REFUSAL_PART: Mapping[str, str] = {".text": ".refusal"}
_TOOL_CALL: Mapping[str, str] = {
    ".tool_use.id": ".id",
    ".tool_use.name": ".function.name",
    ".tool_use.input_json": ".function.arguments",
    ".tool_use": "",
}
_TOOL_RESULT: Mapping[str, str] = {
    ".tool_result.tool_use_id": ".tool_call_id",
    ".tool_result.content": ".content",
    ".tool_result": "",
}
_TOOL: Mapping[str, str] = {
    ".name": ".function.name",
    ".description": ".function.description",
    ".input_schema_json": ".function.parameters",
}


@dataclass(frozen=True)
class Origin:
    """Where one of the Gateway request's blocks came from: the caller's ``path``, its fields'
    names there (``fields``), and the caller's path of the part whose ``cache_control`` it
    carries when that is not ``path`` (a tool message's part)."""

    path: str
    fields: Mapping[str, str]
    marked: str | None = None

    def at(self, rest: str) -> str:
        """The caller's path of the Gateway's ``rest`` of this block (``.tool_use.name``)."""
        if rest.startswith(".cache_control") and self.marked is not None:
            return f"{self.marked}{rest}"
        for gateway in sorted(self.fields, key=len, reverse=True):
            if rest == gateway or rest.startswith(f"{gateway}."):
                return f"{self.path}{self.fields[gateway]}{rest[len(gateway) :]}"
        return f"{self.path}{rest}"


@dataclass
class _Turn:
    """One of the Gateway request's messages: the caller's messages it holds (a tool message
    joins the user turn after it), and where each of its blocks came from."""

    paths: list[str]
    blocks: list[Origin] = field(default_factory=list)


@dataclass
class Origins:
    """Where the Gateway request's parts came from in the caller's (``parse_request``): system
    messages are none of the Gateway's, a tool message joins the user turn after it, a tool
    call is a block, so their indices and field names differ (``at_caller``)."""

    messages: list[_Turn] = field(default_factory=list)
    system: list[Origin] = field(default_factory=list)
    max_tokens: str | None = None  # the field the caller set it by, if it did


# the Gateway request's fields an HTTP caller does not send in the body: its request_id is
# the Idempotency-Key header, its cache options the x-cachemesh-* headers
_NOT_IN_BODY = re.compile(r"^(?:request_id|cache|routing)\b")


# the field a refusal's message names first ("max_tokens: must be > 0"), OpenAI's ``param``
_FIELD = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*|\[\d+\])*): ")


def field_of(message: str) -> str | None:
    """The request field a refusal's message begins by naming, if it does and the caller can
    have sent it in the body."""
    found = _FIELD.match(message)
    if found is None or _NOT_IN_BODY.match(found[1]):
        return None
    return found[1]


def param_of(said: str, origins: Origins) -> str | None:
    """OpenAI's ``param`` of a Gateway refusal in the caller's words (``at_caller``): the
    field it begins by naming, when the caller sent it (a ``max_tokens`` it did not set is
    the front's default)."""
    param = field_of(said)
    if param == "max_tokens" and origins.max_tokens is None:
        return None
    return param


def _caller_path(found: re.Match[str], origins: Origins) -> str | None:
    """The caller's path of a Gateway path, or None when its index is none of the request's."""
    turn, block, system, tool, rest = found.groups()
    if tool is not None:
        return f"tools[{tool}]{_TOOL.get(rest, rest)}"
    if system is not None:
        i = int(system)
        return origins.system[i].at(rest) if i < len(origins.system) else None
    i = int(turn)
    if i >= len(origins.messages):
        return None
    held = origins.messages[i]
    if block is not None:
        j = int(block)
        return held.blocks[j].at(rest) if j < len(held.blocks) else None
    if rest or len(held.paths) == 1:
        return f"{held.paths[0]}{rest}"
    return f"{held.paths[0]} to {held.paths[-1]}"  # the caller's messages of the turn


def at_caller(message: str, origins: Origins) -> str:
    """A Gateway refusal's ``message`` naming the caller's fields wherever it names the
    Gateway request's (``origins``, from ``parse_request``): every path into its messages,
    system blocks and tools, with the field that follows in the caller's names, its
    ``max_tokens`` as the caller set it, and its roles as the caller names them (``user``, not
    the Gateway's ``ROLE_USER``). The Gateway's path it begins with is kept in parentheses. A
    provider's words it passes on name the provider's request by its own indices, and are
    kept as said (``unquoted``): its "messages[2]" (OpenAI's, the system message counted) was
    rewritten as if it were the Gateway's, to "messages[3]"."""

    def paths(part: str) -> str:
        return GATEWAY_PATH.sub(lambda found: _caller_path(found, origins) or found[0], part)

    said = unquoted(message, paths)
    if origins.max_tokens == "max_completion_tokens":
        said = re.sub(r"^max_tokens\b", "max_completion_tokens", said)
    # a named tool is Chat Completions' {"type": "function", "function": {"name": ...}}
    said = re.sub(r"^tool_choice\.name\b", "tool_choice.function.name", said)
    # its roles in the caller's words, whether or not a path changed (a caller whose first
    # message is the assistant's, with no system message, was told "(ROLE_USER)")
    said = unquoted(said, lambda part: role_names(part, "openai"))
    if said == message:
        return message
    first = _FIELD.match(message)
    if first is None or said.startswith(first[0]):  # the path it begins with is the caller's
        return said
    return f"{said} (the Gateway's {first[1]})"


def _answer_only_fields(obj: Obj) -> str | None:
    """The fields of an answer's message that an application sends back with it: its
    ``refusal`` (returned: what the model said instead of content, ``_assistant``);
    ``annotations`` (citations of the content) and the SDK's ``parsed`` (its parse of the
    content) say nothing the content does not, and are ignored; an ``audio`` answer or a
    deprecated ``function_call`` would be lost, and is refused."""
    refusal = obj.text("refusal")
    obj.array("annotations")
    if obj.has("audio"):
        raise invalid(
            f"{obj.at('audio')}: audio answers are not supported by cachemesh; send the "
            "answer's transcript as content",
            obj.at("audio"),
        )
    if obj.has("function_call"):
        raise invalid(
            f"{obj.at('function_call')}: the deprecated function_call is not supported by "
            "cachemesh; use tool_calls",
            obj.at("function_call"),
        )
    return refusal


def _assistant(obj: Obj) -> tuple[list[pb.ContentBlock], list[Origin]] | None:
    """An assistant message's blocks and where each came from; None for an empty answer.

    An answer the model left empty (no text but whitespace, no tool call) comes back as
    ``content: ""`` (the front's answer, unstreamed or streamed, as OpenAI's), or no or empty
    text parts: OpenAI takes each, and an application sending back the history it got sends
    it. It comes back as ``content: null`` too, which OpenAI refuses and the front takes
    (``_answer_shape``): the Node SDK's stream helper builds null from the front's streamed
    empty answer whatever chunk ends it. The Gateway has no empty message nor empty text
    (Anthropic's rule), so it is no Gateway turn: the user messages around it become one turn,
    as Anthropic's API combines consecutive turns of a role. Before, it was a 400 ("an assistant
    message needs content or tool_calls") to an SDK replaying the front's own answer.

    An answer OpenAI's model refused has its words in ``refusal``: sent back with no text in
    the content (``""``, no parts, or content null or absent, which the front takes though
    OpenAI likely refuses it: ``_answer_shape``), a non-empty refusal is the assistant's text
    (the model sees it refused, as OpenAI's model does), not an empty answer dropped."""
    refusal = _answer_only_fields(obj)
    _answer_shape(obj, refusal)
    parts = _blocks_of(obj, required=False, refusals=True)
    texts = [j for j, block in enumerate(parts) if block.text.strip()]
    for j, part in enumerate(parts):
        if j not in texts and part.HasField("cache_control"):  # a breakpoint never dropped
            where = f"{obj.at('content')}[{j}].cache_control"
            raise invalid(
                f"{where}: a cache breakpoint on an empty text part marks nothing the Gateway "
                "keeps; put it on a part with text",
                where,
            )
    blocks = [parts[j] for j in texts]
    origins = _text_origins(obj, texts)
    if not blocks and refusal is not None and refusal.strip():
        blocks.append(pb.ContentBlock(text=refusal))
        origins.append(Origin(obj.at("refusal"), _TEXT_STRING))
    for j, raw in enumerate(obj.array("tool_calls") or []):
        call = Obj(raw, f"{obj.at('tool_calls')}[{j}]")
        call.only(("id", "type", "function", "index"))  # index: a streamed call's, ignored
        call.integer("index")
        fn = call.obj("function", required=True)
        assert fn is not None
        fn.only(("name", "arguments", "parsed_arguments"))  # the SDK's parse of arguments
        arguments = fn.text("arguments", required=True) or ""
        try:
            value = strict_loads(arguments) if arguments.strip() else {}
        except NotStandardJson as exc:
            raise invalid(
                f"{fn.at('arguments')}: not valid JSON: {exc}", fn.at("arguments")
            ) from None
        except ValueError:
            raise invalid(f"{fn.at('arguments')}: not valid JSON", fn.at("arguments")) from None
        except RecursionError:
            raise invalid(
                f"{fn.at('arguments')}: nested too deeply to read as JSON", fn.at("arguments")
            ) from None
        use = pb.ToolUse(
            id=call.text("id", required=True) or "",
            name=fn.text("name", required=True) or "",
            input_json=json_text(value, fn.at("arguments")),
        )
        blocks.append(pb.ContentBlock(tool_use=use))
        origins.append(Origin(call.path, _TOOL_CALL))
    return (blocks, origins) if blocks else None


def _answer_shape(obj: Obj, refusal: str | None) -> None:
    """OpenAI's refusals of an assistant message's shape, which the front makes first so that
    a history it takes is one OpenAI takes too (before, it took both, and the same history
    sent on to OpenAI was its 400): ``tool_calls: []`` (OpenAI's "empty array ... minimum
    length 1": openai/openai-python#2061, home-assistant/core#118577), and no ``content`` at
    all without tool calls (the SDK's ``ChatCompletionAssistantMessageParam``: content is
    "Required unless tool_calls or function_call is specified").

    ``content: null`` without tool calls is taken as an empty answer (no Gateway turn), though
    OpenAI refuses it ("Invalid value for 'content': expected a string, got null",
    langchain-ai/langchainjs#4153, and the loopback's 400): the official Node SDK's stream
    helper (``openai`` 5.x ``ChatCompletionStream``) adds a delta's content only when it is
    truthy, so the ``""`` the front's streamed empty answer ends with is dropped and the
    message it builds holds null; no chunk the front could send avoids it, and a client
    replaying its own history must not be refused for what the front returned. The Gateway
    never carries the null on (an empty answer is no turn), so no provider sees it.

    An answer OpenAI's model refused comes back as ``content: null`` with its words in
    ``refusal``; sent back so, the front takes it, its refusal as the text (``_assistant``).
    OpenAI's reference makes ``content`` "Required unless ``tool_calls`` or ``function_call``
    is specified" and takes a refused answer as a ``refusal`` content part, so OpenAI likely
    refuses it (the loopback, tests/providers/openai_wire.py, does; nothing records OpenAI's
    live answer). The front stays looser on purpose: a client that appends the message an SDK
    returned (``content=None, refusal=...``) builds this history, and the Gateway sends the
    refusal on as text, which every provider takes."""
    calls = obj.raw("tool_calls")
    if isinstance(calls, list) and not calls:
        where = obj.at("tool_calls")
        raise invalid(
            f"{where}: an empty array (OpenAI refuses it too); omit tool_calls when the "
            "answer has no tool call",
            where,
            "empty_array",
        )
    if calls:
        return
    if "content" not in obj.value and not (refusal and refusal.strip()):
        where = obj.at("content")
        raise invalid(
            f"{where}: missing in an assistant message without tool_calls (OpenAI refuses it "
            'too); send the answer\'s text, or "" for an empty answer',
            where,
        )


# --- answers ---------------------------------------------------------------------------------


def completion_id(request_id: str) -> str:
    return f"chatcmpl-{request_id}"


def usage(u: pb.Usage) -> dict[str, Any]:
    prompt = u.input_tokens + u.cache_creation_input_tokens + u.cache_read_input_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": u.output_tokens,
        "total_tokens": prompt + u.output_tokens,
        "prompt_tokens_details": {
            "cached_tokens": u.cache_read_input_tokens,
            "cache_write_tokens": u.cache_creation_input_tokens,
            "audio_tokens": 0,
        },
        "completion_tokens_details": {
            "reasoning_tokens": u.reasoning_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def finish_reason(stop: str) -> str:
    return _FINISH.get(stop, "stop")


def _tool_call(use: pb.ToolUse) -> dict[str, Any]:
    return {
        "id": use.id,
        "type": "function",
        "function": {"name": use.name, "arguments": answered_input(use.input_json)[1]},
    }


def response(end: pb.CompleteResponse, created: int) -> dict[str, Any]:
    text = "".join(b.text for b in end.content if b.WhichOneof("kind") == "text")
    calls = [_tool_call(b.tool_use) for b in end.content if b.WhichOneof("kind") == "tool_use"]
    message: dict[str, Any] = {
        "role": "assistant",
        "content": text if text or not calls else None,
        "refusal": None,
    }
    if calls:
        message["tool_calls"] = calls
    return {
        "id": completion_id(end.request_id),
        "object": "chat.completion",
        "created": created,
        "model": end.model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": finish_reason(end.stop_reason),
                "logprobs": None,
            }
        ],
        "usage": usage(end.usage),
        "system_fingerprint": None,
    }


class ChunkStream:
    """The Gateway's chunks as ``chat.completion.chunk`` objects: the role first, the content
    and tool-call deltas, the finish reason, and (``include_usage``) a last chunk holding only
    the usage. The caller ends the stream with ``data: [DONE]``.

    The role goes out at the start, with ``content: null``: OpenAI's first chunk of an answer
    that begins with a tool call (its text answers' say ``""``, which the SDKs read alike), so
    the SDKs' streamed message of a tool call answer holds ``content`` None as the unstreamed
    one does (with ``""`` sent first it held ``""``). It is not held back for the first block:
    a thinking row's or a tool call's first block comes only when it is whole, and the caller
    saw no chunk until then (2 s after the start, in a review's run). An answer that ends with
    no text and no tool call gets a ``content: ""`` delta before its finish reason, so the
    Python SDK's message of it holds ``""`` as the unstreamed one does, not the null OpenAI
    refuses in a history sent back. The Node SDK's stream helper drops a ``""`` delta and
    holds null all the same, which the front takes back as an empty answer
    (``_answer_shape``)."""

    def __init__(self, created: int, include_usage: bool) -> None:
        self._created = created
        self._include_usage = include_usage
        self._id = ""
        self._model = ""
        self._calls = 0
        self._texts = 0

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }
        if self._include_usage:
            chunk["usage"] = None
        return chunk

    def start(self, start: pb.CompleteResponse) -> list[dict[str, Any]]:
        self._id = completion_id(start.request_id)
        self._model = start.model
        return [self._chunk({"role": "assistant", "content": None, "refusal": None})]

    def delta(self, block: pb.ContentBlock) -> list[dict[str, Any]]:
        kind = block.WhichOneof("kind")
        if kind == "text":
            self._texts += 1
            return [self._chunk({"content": block.text})]
        if kind == "tool_use":
            call = {"index": self._calls, **_tool_call(block.tool_use)}
            self._calls += 1
            return [self._chunk({"tool_calls": [call]})]
        return []

    def end(self, end: pb.CompleteResponse, facts: dict[str, object]) -> list[dict[str, Any]]:
        # an answer of no text and no tool call: its content is "" as the unstreamed answer's
        # is (the Python SDK's message held the role chunk's null, which OpenAI refuses in a
        # history sent back; the Node SDK's holds null still, which the front takes)
        empty = [] if self._texts or self._calls else [self._chunk({"content": ""})]
        last = self._chunk({}, finish_reason(end.stop_reason))
        last["cachemesh"] = facts
        chunks = [*empty, last]
        if self._include_usage:
            tail = self._chunk({})
            tail["choices"] = []
            tail["usage"] = usage(end.usage)
            chunks.append(tail)
        return chunks
