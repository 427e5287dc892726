"""Validation of a Gateway request before any layer sees it.

Every rule raises ``RequestError`` with the gRPC status and a message that names the field, so
a client can fix the request. Validation reads the request only: it changes no state.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Container

from cachemesh import json_schema
from cachemesh.v1 import gateway_pb2 as pb
from services.common import strict_json, tool_choice
from services.common.errors import Code, RequestError, shown
from services.common.models import AUTO, ModelSpec, ModelTable

MAX_BREAKPOINTS = 4
MAX_ID_CHARS = 128
# OpenAI refuses a longer prompt_cache_key (400 string_above_max_length)
MAX_PROMPT_CACHE_KEY_CHARS = 64


def _invalid(message: str) -> RequestError:
    return RequestError(Code.INVALID_ARGUMENT, message)


class UnsupportedValue(RequestError):
    """INVALID_ARGUMENT on a field the target model's API has but whose value it refuses for
    that model (a temperature but its default): its status details say ``UNSUPPORTED_VALUE``
    (``refusal_trailers``), so that the HTTP front answers it with OpenAI's ``code`` for it."""

    def __init__(self, message: str) -> None:
        super().__init__(Code.INVALID_ARGUMENT, message)


def validate_request(request: pb.CompleteRequest, table: ModelTable, deployed: set[str]) -> None:
    _validate_model(request, table, deployed)
    # the rows that refuse a bad schema type, found once for both uses; each tool schema read
    # once, for both its checks (a JSON object; its types)
    schema_strict = _schema_strict(request, table)
    schemas = _schema_verdicts(request, schema_strict)
    _validate_messages(request, schemas)
    _validate_breakpoints(request)
    _validate_sampling(request, table)
    _validate_prefill(request, table)
    _validate_tool_support(request, table)
    _validate_tool_choice(request, table)
    _validate_tool_names(request, table)
    _validate_tool_descriptions(request, table)
    _validate_tool_schemas(request, schema_strict, schemas)


def _validate_model(request: pb.CompleteRequest, table: ModelTable, deployed: set[str]) -> None:
    if request.model != AUTO and (
        table.get(request.model) is None or request.model not in deployed
    ):
        known = ", ".join(sorted(deployed | {AUTO}))
        # NOT_FOUND, as the providers answer an unknown model (HTTP 404: the SDKs raise their
        # NotFoundError, which an application's fallback to another model catches)
        raise RequestError(
            Code.NOT_FOUND, f"model: unknown model id {shown(request.model)}; use one of: {known}"
        )
    if request.max_tokens <= 0:
        raise _invalid(f"max_tokens: must be > 0, got {request.max_tokens}")
    limit = min(spec.max_output_tokens for spec in table.answering(request.model))
    if request.max_tokens > limit:
        raise _invalid(
            f"max_tokens: {request.max_tokens} is above the limit of {request.model} ({limit})"
        )
    if len(request.request_id) > MAX_ID_CHARS:
        raise _invalid(f"request_id: at most {MAX_ID_CHARS} characters")
    if len(request.cache.namespace) > MAX_ID_CHARS:
        raise _invalid(f"cache.namespace: at most {MAX_ID_CHARS} characters")
    if len(request.cache.prompt_cache_key) > MAX_PROMPT_CACHE_KEY_CHARS:
        raise _invalid(
            f"cache.prompt_cache_key: at most {MAX_PROMPT_CACHE_KEY_CHARS} characters (OpenAI's "
            f"limit), got {len(request.cache.prompt_cache_key):,}"
        )
    if request.routing.HasField("threshold"):
        threshold = request.routing.threshold
        if not (math.isfinite(threshold) and -1.0 <= threshold <= 1.0):
            raise _invalid(
                f"routing.threshold: must be a number within [-1, 1] (the router's score is "
                f"P(large right) - P(small right)), got {threshold}"
            )
        if request.model != AUTO:
            raise _invalid(
                f'routing.threshold: only model "auto" is routed; {shown(request.model)} was named'
            )


# The largest text whose verdict is remembered: 1,024 of them at the router's 1 MiB request
# limit would hold ~1 GB of clients' text. A tool schema is a few kB.
_CACHED_JSON_CHARS = 16 * 1024


def _json_object(text: str, where: str) -> None:
    problem, _ = _verdict(text, schema=False, types=False)
    if problem is not None:
        raise _invalid(f"{where}: {problem}")


# What keeps a JSON text from being sent, and, for a tool's schema, its first type JSON Schema
# has not: (not a JSON object, or None; a type problem, or None)
_Verdict = tuple[str | None, str | None]
_NONE: _Verdict = (None, None)  # a tool without a schema


def _verdict(text: str, *, schema: bool, types: bool) -> _Verdict:
    """``text``'s verdict, read once: from the cache when it is small (a schema's then always
    with its types walked, once), else judged afresh, its types walked only when ``types``."""
    if len(text) <= _CACHED_JSON_CHARS:
        return _cached_verdict(text, schema)
    return _judge(text, types=schema and types)


@functools.lru_cache(maxsize=1024)
def _cached_verdict(text: str, schema: bool) -> _Verdict:
    """Cached: an agent sends the same tool schemas with every request, and reading them again
    each time found nothing new. One cache for a schema's two checks and a tool call's input
    (a schema's text is hashed and held once)."""
    return _judge(text, types=schema)


def _judge(text: str, *, types: bool) -> _Verdict:
    value, problem = _json_object_read(text)
    if problem is not None:
        return problem, None
    return None, _type_problem(value) if types else None


_NOT_STANDARD = "must be standard JSON (no NaN/Infinity/lone surrogates)"
_TOO_DEEP = (
    f"must be a JSON object nested at most {strict_json.MAX_DEPTH} levels deep (objects and "
    "arrays), got one nested deeper"
)


def _json_object_read(text: str) -> tuple[object, str | None]:
    """``text``'s value and what keeps it from being a JSON object the providers' SDKs can
    send, or None. Python's ``json`` reads NaN, Infinity, numbers beyond a double (as inf) and
    lone surrogate escapes; the SDKs then refuse to encode the body (ValueError,
    UnicodeEncodeError)."""
    try:
        value = strict_json.loads(text)
    except strict_json.NotStandardJson as exc:
        return None, f"{_NOT_STANDARD}: {exc}"
    except RecursionError:
        return None, _TOO_DEEP
    except ValueError:
        return None, "must be a JSON object, got invalid JSON"
    if not isinstance(value, dict):
        return None, f"must be a JSON object, got {type(value).__name__}"
    if strict_json.nested_deeper_than(text, value):
        return None, _TOO_DEEP
    if strict_json.holds_lone_surrogate(text, value):
        return None, f"{_NOT_STANDARD}: it holds a lone UTF-16 surrogate escape (\\uD800-\\uDFFF)"
    return value, None


class _ToolTurns:
    """The declared tools, the tool_use ids seen so far, which of them already have their
    result, and those of the last message still waiting for theirs (id -> where)."""

    def __init__(self, declared: set[str] | None = None) -> None:
        self.declared = declared if declared is not None else set()
        self.uses: set[str] = set()
        self.answered: set[str] = set()
        self.waiting: dict[str, str] = {}


def _validate_block(block: pb.ContentBlock, where: str, role: int, turns: _ToolTurns) -> None:
    kind = block.WhichOneof("kind")
    if kind is None:
        raise _invalid(f"{where}: a content block needs text, tool_use or tool_result")
    if kind == "text" and not block.text.strip():
        raise _invalid(f"{where}.text: text blocks must not be empty")
    if kind == "tool_use":
        use = block.tool_use
        if role != pb.ROLE_ASSISTANT:
            raise _invalid(f"{where}.tool_use: only assistant messages may hold tool_use blocks")
        if not use.id or not use.name:
            raise _invalid(f"{where}.tool_use: id and name are required")
        if use.id in turns.uses:
            raise _invalid(f"{where}.tool_use.id: {shown(use.id)} is used twice")
        if use.name not in turns.declared:
            raise _invalid(
                f"{where}.tool_use.name: {shown(use.name)} is not a declared tool; declare "
                "it in tools (a model can only call the tools it was given)"
            )
        if use.input_json:
            _json_object(use.input_json, f"{where}.tool_use.input_json")
        turns.uses.add(use.id)
        turns.waiting[use.id] = where
    if kind == "tool_result":
        result_id = block.tool_result.tool_use_id
        if role != pb.ROLE_USER:
            raise _invalid(f"{where}.tool_result: only user messages may hold tool_result blocks")
        if result_id not in turns.uses:
            raise _invalid(
                f"{where}.tool_result.tool_use_id: {shown(result_id)} matches no earlier "
                "tool_use block"
            )
        if result_id in turns.answered:
            raise _invalid(
                f"{where}.tool_result.tool_use_id: {shown(result_id)} already has a tool_result"
            )
        turns.answered.add(result_id)


def _validate_tools(request: pb.CompleteRequest, schemas: list[_Verdict]) -> set[str]:
    """The declared tools' names. ``schemas``: each tool's schema's verdict."""
    names: set[str] = set()
    for i, tool in enumerate(request.tools):
        if not tool.name:
            raise _invalid(f"tools[{i}].name: a tool needs a name")
        if tool.name in names:
            raise _invalid(f"tools[{i}].name: {shown(tool.name)} is declared twice")
        names.add(tool.name)
        if (problem := schemas[i][0]) is not None:
            raise _invalid(f"tools[{i}].input_schema_json: {problem}")
    return names


def _unanswered(turns: _ToolTurns, next_message: str) -> RequestError:
    use_id, where = next(iter(turns.waiting.items()))
    return _invalid(
        f"{where}.tool_use: {shown(use_id)} has no tool_result in {next_message}; each "
        "tool_use needs its tool_result in the user message that follows it"
    )


def _validate_messages(request: pb.CompleteRequest, schemas: list[_Verdict]) -> None:
    if not request.messages:
        raise _invalid("messages: at least one message is required")
    if request.messages[0].role != pb.ROLE_USER:
        raise _invalid("messages[0].role: the first message must be the user's (ROLE_USER)")
    for i, block in enumerate(request.system):
        if block.WhichOneof("kind") != "text":
            raise _invalid(f"system[{i}]: system blocks must be text")
        _validate_block(block, f"system[{i}]", pb.ROLE_UNSPECIFIED, _ToolTurns())
    turns = _ToolTurns(_validate_tools(request, schemas))
    for i, message in enumerate(request.messages):
        if message.role not in (pb.ROLE_USER, pb.ROLE_ASSISTANT):
            raise _invalid(f"messages[{i}].role: must be ROLE_USER or ROLE_ASSISTANT")
        if not message.content:
            raise _invalid(f"messages[{i}].content: a message needs at least one block")
        waiting = dict(turns.waiting)  # the previous message's calls
        turns.waiting.clear()
        for j, block in enumerate(message.content):
            _validate_block(block, f"messages[{i}].content[{j}]", message.role, turns)
        if any(use_id not in turns.answered for use_id in waiting):
            turns.waiting = {k: v for k, v in waiting.items() if k not in turns.answered}
            raise _unanswered(turns, f"messages[{i}]")
    if turns.waiting:
        raise _unanswered(turns, "the request (it ends with the call)")


def breakpoints(request: pb.CompleteRequest) -> list[tuple[str, int]]:
    """Each ``cache_control`` breakpoint of the request: where it is and its TTL."""
    marks: list[tuple[str, int]] = []
    for i, tool in enumerate(request.tools):
        if tool.HasField("cache_control"):
            marks.append((f"tools[{i}]", tool.cache_control.ttl))
    for i, block in enumerate(request.system):
        if block.HasField("cache_control"):
            marks.append((f"system[{i}]", block.cache_control.ttl))
    for i, message in enumerate(request.messages):
        for j, block in enumerate(message.content):
            if block.HasField("cache_control"):
                marks.append((f"messages[{i}].content[{j}]", block.cache_control.ttl))
    return marks


def _validate_breakpoints(request: pb.CompleteRequest) -> None:
    marks = breakpoints(request)
    if len(marks) > MAX_BREAKPOINTS:
        raise _invalid(
            f"cache_control: at most {MAX_BREAKPOINTS} breakpoints per request, got {len(marks)} "
            f"({', '.join(where for where, _ in marks)})"
        )
    for where, ttl in marks:
        if ttl not in pb.CacheTtl.values():
            raise _invalid(
                f"{where}.cache_control.ttl: unknown value {ttl}; use one of "
                + ", ".join(pb.CacheTtl.keys())
            )
    seen_5m = False
    for where, ttl in marks:
        if ttl == pb.CACHE_TTL_1H and seen_5m:
            raise _invalid(
                f"{where}.cache_control.ttl: a 1-hour breakpoint must come before every "
                "5-minute one"
            )
        seen_5m = seen_5m or ttl != pb.CACHE_TTL_1H


# The temperature ranges of the providers' APIs: Anthropic's Messages API takes [0, 1], OpenAI's
# Chat Completions (and the compatible engines) [0, 2]; the simulator takes either.
_ANTHROPIC_MAX_TEMPERATURE = 1.0
_MAX_TEMPERATURE = 2.0
# the temperature a model that samples at its default only takes (``default_temperature_only``)
DEFAULT_TEMPERATURE = 1.0


def _validate_temperature(request: pb.CompleteRequest, table: ModelTable) -> None:
    """Within the range of the target model's provider (for ``auto``, of every tier's): a value
    another provider's API would refuse is refused here, naming the model, never clamped. So
    is a value but 1 to a model that takes only its default (``default_temperature_only``:
    OpenAI's reasoning models, Claude Sonnet 5 and Opus 5), or to ``auto`` when it may pick
    one (``UnsupportedValue``): before, it went to the provider and came back its 400, and
    ``auto`` answered or refused it by the tier it picked."""
    t = request.temperature
    anthropic = [s.id for s in table.answering(request.model) if s.provider == "anthropic"]
    limit = _ANTHROPIC_MAX_TEMPERATURE if anthropic else _MAX_TEMPERATURE
    if not math.isfinite(t) or not 0.0 <= t <= limit:
        why = (
            f" for {anthropic[0]} (Anthropic's range; OpenAI-compatible and simulated models "
            "take [0, 2])"
            if anthropic
            else ""
        )
        raise _invalid(f"temperature: must be within [0, {limit:g}]{why}, got {t}")
    fixed = [s.id for s in table.answering(request.model) if s.default_temperature_only]
    if fixed and t != DEFAULT_TEMPERATURE:
        which = (
            f"auto may pick {fixed[0]}, which takes"
            if request.model == AUTO
            else f"{fixed[0]} takes"
        )
        raise UnsupportedValue(
            f"temperature: {which} only its default, {DEFAULT_TEMPERATURE:g} (its provider "
            f"refuses any other value for it); omit temperature or send {DEFAULT_TEMPERATURE:g}"
            f"{', or name a model that takes one' if request.model == AUTO else ''}, got {t}"
        )


_SEMANTIC_MODES = frozenset(pb.SemanticMode.values())  # once: ``values()`` makes a list a call


def _validate_sampling(request: pb.CompleteRequest, table: ModelTable) -> None:
    if request.cache.semantic not in _SEMANTIC_MODES:
        raise _invalid(
            f"cache.semantic: unknown mode {request.cache.semantic}; use one of "
            + ", ".join(pb.SemanticMode.keys())
        )
    if request.HasField("temperature"):
        _validate_temperature(request, table)
    if request.cache.HasField("threshold"):
        th = request.cache.threshold
        if not math.isfinite(th) or not 0.0 <= th <= 1.0:
            raise _invalid(f"cache.threshold: cosine similarity must be within [0, 1], got {th}")


def _validate_prefill(request: pb.CompleteRequest, table: ModelTable) -> None:
    """A last assistant message is a prefill, the text the answer continues (the Messages
    API's meaning, which the Gateway's follows). OpenAI's Chat Completions has no prefill, nor
    has vLLM's without its ``continue_final_message``: the model answers a new message after
    it, so to a row that does not continue one (its ``takes_prefill``, by default its
    provider's way; or ``auto`` when it may pick one) it is refused, naming the message
    (before, it was sent: a prefill of "{" came back as an answer that does not continue it,
    which the caller joins to the "{")."""
    last = len(request.messages) - 1
    if request.messages[last].role != pb.ROLE_ASSISTANT:
        return
    answering = table.answering(request.model)
    answering_anew = [spec for spec in answering if not spec.continues_prefill]
    if answering_anew:
        first = answering_anew[0]
        which = f"auto, which may pick {first.id}" if request.model == AUTO else first.id
        if first.provider == "self_hosted":
            # an operator's engine: its row may only lack the flag (llama-server continues one)
            why = (
                "its row of the model table does not say its engine continues one: the model "
                "is taken to answer a new message after it"
            )
            instead = (
                "pick a model that takes a prefill; if its engine continues a last assistant "
                "message (llama-server does), the operator sets `takes_prefill = true` in its "
                "row of the model table"
            )
        else:
            why = "its API has no prefill: its model answers a new message after it"
            instead = "pick a model that takes a prefill (Anthropic's)"
        raise _invalid(
            f"messages[{last}]: a last assistant message (a prefill, whose text the answer "
            f"continues) is not supported by {which} ({why}); end the messages with a user "
            f"message, or {instead}"
        )


# The tool names a hosted provider's API takes: letters, digits, '_' and '-', and at most so many
# characters. OpenAI's Chat Completions: 64 (its API reference: "Must be a-z, A-Z, 0-9, or
# contain underscores and dashes, with a maximum length of 64"); Anthropic's Messages API: 128
# by its own 400 since mid-2025 ("tools.16.custom.name: String should match pattern
# '^[a-zA-Z0-9_-]{1,128}$'"; its tool reference still says 64: a name of 65 to 128 characters
# goes, and the provider's own 400, if any, is the caller's INVALID_ARGUMENT as before). A
# self-hosted engine takes other names (llama-server, vLLM: "functions.calc", a dotted MCP
# name): never refused here, nor by the simulator.
_TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]+")
_TOOL_NAME_CHARS = {"anthropic": 128, "openai": 64}


def _strict_rows(
    request: pb.CompleteRequest, table: ModelTable, providers: Container[str]
) -> list[ModelSpec]:
    """The rows ``request`` may go to (for ``auto``, each tier's) whose provider is one of
    ``providers`` (those that refuse what a check looks for)."""
    return [s for s in table.answering(request.model) if s.provider in providers]


def _whose_provider(request: pb.CompleteRequest, spec: ModelSpec) -> str:
    """How a refusal names the row ``spec`` whose provider refuses the request: ``auto`` may
    pick it, or it is the model named."""
    if request.model == AUTO:
        return f"auto may pick {spec.id}, whose provider takes"
    return f"{spec.id}'s provider takes"


def _validate_tool_names(request: pb.CompleteRequest, table: ModelTable) -> None:
    """A tool name the target row's provider refuses (for ``auto``, any tier's that does) is
    refused here, naming the tool, the model and the rule, before anything is sent: before, it
    went to the provider, whose 400 came back as the caller's INVALID_ARGUMENT after the cache
    lookup and the provider's round trip, and ``auto`` answered or refused it by the tier it
    picked."""
    if not request.tools:
        return
    strict = _strict_rows(request, table, _TOOL_NAME_CHARS)
    if not strict:
        return
    for i, tool in enumerate(request.tools):
        name = tool.name
        for spec in strict:
            limit = _TOOL_NAME_CHARS[spec.provider]
            if len(name) <= limit and _TOOL_NAME.fullmatch(name):
                continue
            which = _whose_provider(request, spec)
            instead = ", or name a model that takes it" if request.model == AUTO else ""
            raise _invalid(
                f"tools[{i}].name: {shown(name)} is not a tool name {which} (letters, digits, "
                f"'_' and '-' only, at most {limit} characters: ^[a-zA-Z0-9_-]{{1,{limit}}}$); "
                f"rename the tool{instead}"
            )


# The longest tool description OpenAI's Chat Completions takes: its 400 "Invalid
# 'tools[13].function.description': string too long. Expected a string with maximum length
# 1024, but got a string with length 1103 instead." (code string_above_max_length, as clients
# met it: getsentry/sentry-mcp#106, OpenHands#4838, langchain-ai/open_deep_research#80; the
# loopback server's ``TOOL_DESCRIPTION_CHARS``). Counted here in code points: a description
# longer so is longer in any unit OpenAI may count. Anthropic takes longer ones (an MCP
# server's tools often have them), and a self-hosted engine any.
_TOOL_DESCRIPTION_CHARS = {"openai": 1024}


def _validate_tool_descriptions(request: pb.CompleteRequest, table: ModelTable) -> None:
    """A tool description over what the target row's provider takes (for ``auto``, any tier's
    that does) is refused here, naming the tool, the model and the limit: before, it went to
    OpenAI, whose 400 came back as the caller's INVALID_ARGUMENT after the cache lookup and a
    provider round trip, and ``auto`` answered or refused it by the tier it picked."""
    if not request.tools:
        return
    strict = _strict_rows(request, table, _TOOL_DESCRIPTION_CHARS)
    if not strict:
        return
    for i, tool in enumerate(request.tools):
        for spec in strict:
            limit = _TOOL_DESCRIPTION_CHARS[spec.provider]
            if len(tool.description) <= limit:
                continue
            which = _whose_provider(request, spec)
            instead = ", or name a model that takes it" if request.model == AUTO else ""
            raise _invalid(
                f"tools[{i}].description: {len(tool.description):,} characters, over what "
                f"{which} ({limit:,} characters at most); shorten it (the rest can go in the "
                f"system prompt){instead}"
            )


# The types JSON Schema has. OpenAI's and Anthropic's APIs take a tool's parameters as "a JSON
# Schema object" and refuse one that is not valid JSON Schema (OpenAI: 400
# invalid_function_parameters, "Invalid schema for function '...': ..."; Anthropic: 400
# "tools.N.custom.input_schema: JSON schema is invalid. It must match JSON Schema draft
# 2020-12"). Only a ``type`` is checked here (a name JSON Schema has not, as BFCL's data and
# Python-minded clients write: "dict", "float"), not the rest of the meta-schema, in the schema
# and every schema nested in it (``cachemesh.json_schema``'s keywords, which the loopback
# servers walk too). A self-hosted engine is not held to it (its own checks, if any, are its
# own).
_SCHEMA_TYPES = json_schema.TYPES
# the providers that refuse a tool schema's type JSON Schema has not
_SCHEMA_TYPE_PROVIDERS = frozenset({"openai", "anthropic"})
# what a client that wrote a Python type name meant, said in the message
_SCHEMA_TYPE_FOR = {
    "dict": "use object", "float": "use number", "tuple": "use array", "list": "use array",
    "int": "use integer", "str": "use string", "bool": "use boolean",
    "any": "leave type out: a schema without one takes any value",
}  # fmt: skip


def _schema_strict(request: pb.CompleteRequest, table: ModelTable) -> list[ModelSpec]:
    """The rows ``request`` may go to whose provider refuses a type JSON Schema has not."""
    if not request.tools:
        return []
    return _strict_rows(request, table, _SCHEMA_TYPE_PROVIDERS)


def _schema_verdicts(request: pb.CompleteRequest, strict: list[ModelSpec]) -> list[_Verdict]:
    """Each tool's schema's verdict, its text read once (its types walked when a row of
    ``strict`` may take it, or once for the cache)."""
    return [
        _verdict(text, schema=True, types=bool(strict))
        if (text := tool.input_schema_json)
        else _NONE
        for tool in request.tools
    ]


_TYPE_SET = frozenset(_SCHEMA_TYPES)
# each keyword whose value is a schema, a list of them or a map of names to them
_SUBSCHEMAS = frozenset(json_schema.ONE_SCHEMA + json_schema.SCHEMA_LISTS + json_schema.SCHEMA_MAPS)
_MAP_KEYWORDS = frozenset(json_schema.SCHEMA_MAPS)


def _type_ok(kind: object) -> bool:
    if isinstance(kind, str):
        return kind in _TYPE_SET
    if not isinstance(kind, list) or not kind:
        return False
    return all(isinstance(k, str) and k in _TYPE_SET for k in kind) and len(set(kind)) == len(kind)


def _type_problem(schema: object) -> str | None:
    """Where in ``schema`` (a parsed tool schema) the first ``type`` JSON Schema has not is,
    and what it is, else None."""
    found = _bad_type(schema)
    if found is None:
        return None
    steps, kind = found
    where = "".join(reversed(steps))
    hint = ""
    if isinstance(kind, str):
        shown_kind = shown(kind)
        if (meant := _SCHEMA_TYPE_FOR.get(kind)) is not None:
            hint = f" (for {shown_kind}, {meant})"
    else:
        shown_kind = json.dumps(kind)[:64]
    return (
        f"{where}type: {shown_kind} is not a JSON Schema type: use one of "
        f"{', '.join(_SCHEMA_TYPES)}, or a list of distinct ones{hint}"
    )


def _bad_type(schema: object) -> tuple[list[str], object] | None:
    """The first ``type`` in ``schema`` JSON Schema has not (in the schema's own order): the
    steps to it, innermost first (named only on the way out of the one found: a schema's
    hundreds of good members cost no text), and its value; else None. Only the schema's own
    keys are looked up (a property's two or three, not every keyword)."""
    if not isinstance(schema, dict):
        return None
    if "type" in schema and not _type_ok(schema["type"]):
        return [], schema["type"]
    for key, sub in schema.items():
        if key not in _SUBSCHEMAS:
            continue
        if isinstance(sub, list):  # anyOf, prefixItems, draft-07's items...
            for i, item in enumerate(sub):
                if (found := _bad_type(item)) is not None:
                    found[0].append(f"{key}[{i}].")
                    return found
        elif isinstance(sub, dict) and key in _MAP_KEYWORDS:
            for name, item in sub.items():
                if (found := _bad_type(item)) is not None:
                    found[0].append(f"{key}[{shown(str(name))}].")
                    return found
        elif (found := _bad_type(sub)) is not None:
            found[0].append(f"{key}.")
            return found
    return None


def _validate_tool_schemas(
    request: pb.CompleteRequest, strict: list[ModelSpec], schemas: list[_Verdict]
) -> None:
    """A tool schema naming a type JSON Schema has not, to a row whose provider refuses it
    (for ``auto``, any tier's that does), is refused here, naming the tool, the field and the
    model, before anything is sent: before, it went to the provider, whose 400 came back after
    the cache lookup and the round trip (and ``auto`` answered or refused it by its tier).
    ``strict``: the rows that refuse it (``_schema_strict``); ``schemas``: each tool's
    schema's verdict (``_schema_verdicts``)."""
    if not strict:
        return
    for i, tool in enumerate(request.tools):
        problem = schemas[i][1]
        if problem is None:
            continue
        spec = strict[0]
        which = _whose_provider(request, spec)
        raise _invalid(
            f"tools[{i}].input_schema_json: tool {shown(tool.name)}: {problem}; {which} a "
            "tool's schema as JSON Schema only"
        )


def _first_row_without(
    request: pb.CompleteRequest, table: ModelTable, takes: Callable[[ModelSpec], bool]
) -> str | None:
    """The first row that may answer ``request`` and does not ``takes`` what it asks, as a
    refusal names it (``auto, which may pick ROW`` for ``auto``), or None when every row does."""
    without = [spec for spec in table.answering(request.model) if not takes(spec)]
    if not without:
        return None
    first = without[0].id
    return f"auto, which may pick {first}" if request.model == AUTO else first


def _validate_tool_choice(request: pb.CompleteRequest, table: ModelTable) -> None:
    """A forced choice must be one the providers take: a named tool among the request's
    tools, ANY with tools, a name only with TOOL (``tool_choice.problem``); and a named tool
    one the answering rows' engines honour (``takes_named_tool_choice``: llama-server takes
    ``tool_choice`` as a string only and answered a named one as auto without a word), or
    ``auto`` when it may pick such a row."""
    problem = tool_choice.problem(request)
    if problem is not None:
        raise _invalid(problem)
    if tool_choice.sent_mode(request) != "tool":
        return
    which = _first_row_without(request, table, lambda spec: spec.takes_named_tool_choice)
    if which is None:
        return
    raise _invalid(
        f"tool_choice.name: a named tool is not supported by {which} (its row of the model "
        "table says `takes_named_tool_choice = false`: its engine takes tool_choice only as "
        "none, required or auto, and would answer a named one as auto); send mode ANY "
        "(the Messages API's any, Chat Completions' required) with only that tool in tools, "
        "or pick a model that takes a named tool"
    )


def _validate_tool_support(request: pb.CompleteRequest, table: ModelTable) -> None:
    """Tools to a row whose model is not given them (its ``takes_tools``: an engine whose chat
    template has no tool support drops them without a word), or to ``auto`` when it may pick
    one, are refused, naming the field: before, such a request was answered as if it had no
    tools (llama-server serving SmolLM2: the same prompt tokens with a tool as without, an
    assistant's tool call sent as an empty turn). A conversation's tool calls and results need
    their tools declared (``_validate_messages``): ``tools`` covers them."""
    if not request.tools:
        return
    which = _first_row_without(request, table, lambda spec: spec.takes_tools)
    if which is None:
        return
    raise _invalid(
        f"tools: tools and tool calls are not supported by {which} (its row of the model "
        "table says `takes_tools = false`: its engine's model is not given them, and would "
        "answer as if there were none); send the request without tools to it (its messages "
        "without their tool_use / tool_result blocks too: a call of a tool the request does not "
        "declare is refused), or pick a model that takes tools; if its engine's model does, the "
        "operator sets `takes_tools = true` in its row of the model table"
    )
