"""OpenAI Chat Completions' wire format, as https://platform.openai.com/docs/api-reference/chat
shows it: ``chat.completion.chunk`` objects (role chunk, content or tool_calls deltas, the
finish_reason chunk, the usage chunk with empty choices that ``stream_options.include_usage``
asks for), then ``data: [DONE]``; error bodies ``{"error": {message, type, param, code}}``;
and the request checks the real API makes before it answers (``refusal``): what its reasoning
models refuse (https://developers.openai.com/api/docs/guides/reasoning, the SDK's
``max_tokens`` docstring), ``stream_options`` without ``stream``, a ``prompt_cache_key`` over
64 characters."""

from __future__ import annotations

import re
from typing import Any

from openai.types.chat.completion_create_params import CompletionCreateParamsBase

from tests.providers.schema_types import bad_type
from tests.providers.wire_server import Event, Reply, dumps


def _chunk(model: str, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> Event:
    return (
        None,
        dumps(
            {
                "id": "chatcmpl-loopback",
                "object": "chat.completion.chunk",
                "created": 1767225600,
                "model": model,
                "system_fingerprint": "fp_loopback",
                "choices": choices,
                "usage": usage,
            }
        ),
    )


def usage(prompt: int, cached: int, completion: int, reasoning: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": reasoning,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def stream(
    model: str,
    texts: list[str],
    report: dict[str, Any] | None,
    *,
    finish: str = "stop",
    tool: tuple[str, str, list[str]] | None = None,  # (id, name, argument pieces)
    cut_after: int | None = None,
    reasoning: tuple[str, ...] = (),  # the model's thinking, before ``texts[reasoning_at]``
    reasoning_at: int = 0,
    # llama-server's and DeepSeek's field; vLLM's newer one, OpenRouter's and Ollama's is
    # "reasoning"
    reasoning_field: str = "reasoning_content",
) -> list[Event]:
    """The events of one streamed answer: a role chunk, ``reasoning`` pieces (as an engine
    serving a reasoning model streams its thinking) placed before the ``reasoning_at``-th
    text, the texts, a tool call's name and argument pieces, the finish_reason chunk, the
    usage chunk (``report``), ``[DONE]``; ``cut_after``: only the first that many texts."""

    def choice(delta: dict[str, Any], finish_reason: str | None = None) -> list[dict[str, Any]]:
        return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]

    events = [_chunk(model, choice({"role": "assistant", "content": "", "refusal": None}))]
    thinking = [_chunk(model, choice({reasoning_field: piece})) for piece in reasoning]
    for n, text in enumerate(texts):
        if n == reasoning_at:
            events += thinking
        if cut_after is not None and n == cut_after:
            return events
        events.append(_chunk(model, choice({"content": text})))
    if reasoning_at >= len(texts):
        events += thinking
    if tool is not None:
        call_id, name, pieces = tool
        events.append(
            _chunk(
                model,
                choice(
                    {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": call_id,
                                "type": "function",
                                "function": {"name": name, "arguments": ""},
                            }
                        ]
                    }
                ),
            )
        )
        for piece in pieces:
            events.append(
                _chunk(
                    model, choice({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
                )
            )
    events.append(_chunk(model, choice({}, finish)))
    if report is not None:
        events.append(_chunk(model, [], report))
    events.append((None, "[DONE]"))
    return events


def error(
    status: int,
    kind: str,
    message: str,
    code: str | None = None,
    headers: dict[str, str] | None = None,
    param: str | None = None,
) -> Reply:
    return Reply(
        status=status,
        body={"error": {"message": message, "type": kind, "param": param, "code": code}},
        headers=headers or {},
    )


# llama-server's 400 for a prompt over the context it was started with
TOO_LONG_LLAMA = Reply(
    status=400,
    body={
        "error": {
            "code": 400,
            "message": "request (3012 tokens) exceeds the available context size (2048 "
            "tokens), try increasing it",
            "type": "exceed_context_size_error",
            "n_prompt_tokens": 3012,
            "n_ctx": 2048,
        }
    },
)


def error_event(kind: str, code: int | str, message: str) -> Reply:
    """An OpenAI-compatible engine's error inside a stream, before any token, as vLLM sends
    it (its ``ErrorResponse`` under ``error``, the HTTP status in ``code``): the answer's own
    status was already 200."""
    error = {"message": message, "type": kind, "param": None, "code": code}
    return Reply(events=[(None, dumps({"error": error}))])


# OpenAI's reasoning models (reasoning on by default, no way to turn it off): they take no
# sampling setting but its default, and no ``max_tokens`` (``max_completion_tokens`` counts the
# reasoning too). gpt-5.1 and later default to reasoning effort "none", under which they take
# a temperature: not here. gpt-5-chat-* is no reasoning model.
_REASONING = re.compile(r"^(?:o[134](?:-mini)?|gpt-5(?:-mini|-nano)?)(?:-\d{4}-\d{2}-\d{2})?$")
# the sampling settings and their only value such a model takes (OpenAI's defaults)
_SAMPLING_DEFAULTS = {"temperature": 1, "top_p": 1, "presence_penalty": 0, "frequency_penalty": 0}
PROMPT_CACHE_KEY_CHARS = 64


# the function names Chat Completions takes ("Must be a-z, A-Z, 0-9, or contain underscores and
# dashes, with a maximum length of 64": the API reference; its 400s as clients met them)
_FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]+$")
MAX_FUNCTION_NAME_CHARS = 64


# OpenAI's own model ids: the loopback server stands for OpenAI-compatible engines too, so the
# checks of OpenAI's API alone (a function name, an argument it does not have, a tool call id
# or a function description over its lengths) are not an engine's, which takes other function
# names (llama-server, vLLM), extra arguments and its own longer ids (vLLM's 46 characters)
_OPENAI_MODEL = re.compile(r"^(?:gpt-|chatgpt-|o[1-9])")


def _function_name_refusal(body: dict[str, Any]) -> Reply | None:
    """The real API's 400 to a tool whose function name it does not take (to one of OpenAI's
    own models), else None."""
    if not _OPENAI_MODEL.match(str(body.get("model", ""))):
        return None
    for t, tool in enumerate(body.get("tools") or []):
        name = str((tool.get("function") or {}).get("name", "")) if isinstance(tool, dict) else ""
        where = f"tools[{t}].function.name"
        if not _FUNCTION_NAME.match(name):
            return error(
                400,
                "invalid_request_error",
                f"Invalid '{where}': string does not match pattern. Expected a string that "
                f"matches the pattern '{_FUNCTION_NAME.pattern}'.",
                code="invalid_value",
                param=where,
            )
        if len(name) > MAX_FUNCTION_NAME_CHARS:
            return error(
                400,
                "invalid_request_error",
                f"Invalid '{where}': string too long. Expected a string with maximum length "
                f"{MAX_FUNCTION_NAME_CHARS}, but got a string with length {len(name)} instead.",
                code="string_above_max_length",
                param=where,
            )
    return None


def _parameters_refusal(body: dict[str, Any]) -> Reply | None:
    """The real API's 400 to a tool whose ``parameters`` name a type JSON Schema has not (to
    one of OpenAI's own models: ``schema_types``), else None."""
    if not _OPENAI_MODEL.match(str(body.get("model", ""))):
        return None
    for t, tool in enumerate(body.get("tools") or []):
        function = (tool.get("function") or {}) if isinstance(tool, dict) else {}
        problem = bad_type(function.get("parameters"))
        if problem is not None:
            return error(
                400,
                "invalid_request_error",
                f"Invalid schema for function '{function.get('name')}': {problem}.",
                code="invalid_function_parameters",
                param=f"tools[{t}].function.parameters",
            )
    return None


def refusal(headers: dict[str, str], body: dict[str, Any]) -> Reply | None:
    """The real API's 400 to a request it refuses before answering, in its words, else None:
    a sampling setting other than its default, or ``max_tokens``, to a reasoning model;
    ``stream_options`` without ``stream``; a ``prompt_cache_key`` over 64 characters; a
    function name outside ``^[a-zA-Z0-9_-]+$`` or over 64 characters, a function's
    ``parameters`` naming a type JSON Schema has not (OpenAI's own: an OpenAI-compatible
    engine takes others)."""
    if (named := _function_name_refusal(body)) is not None:
        return named
    if (typed := _parameters_refusal(body)) is not None:
        return typed
    model = str(body.get("model", ""))
    if _REASONING.match(model):
        for name, only in _SAMPLING_DEFAULTS.items():
            value = body.get(name)
            if value is not None and value != only:
                return error(
                    400,
                    "invalid_request_error",
                    f"Unsupported value: '{name}' does not support {value} with this model. "
                    f"Only the default ({only}) value is supported.",
                    code="unsupported_value",
                    param=name,
                )
        if "max_tokens" in body:
            return error(
                400,
                "invalid_request_error",
                "Unsupported parameter: 'max_tokens' is not supported with this model. Use "
                "'max_completion_tokens' instead.",
                code="unsupported_parameter",
                param="max_tokens",
            )
    if body.get("stream_options") is not None and not body.get("stream"):
        return error(
            400,
            "invalid_request_error",
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            code="invalid_value",
            param="stream_options",
        )
    if (refused := _structure(model, body)) is not None:
        return refused
    key = body.get("prompt_cache_key")
    if isinstance(key, str) and len(key) > PROMPT_CACHE_KEY_CHARS:
        return error(
            400,
            "invalid_request_error",
            f"Invalid 'prompt_cache_key': string too long. Expected a string with maximum "
            f"length {PROMPT_CACHE_KEY_CHARS}, but got a string with length {len(key)} instead.",
            code="string_above_max_length",
            param="prompt_cache_key",
        )
    return None


# the request's arguments Chat Completions has (the SDK's own list of them); any other is its
# 400 "Unrecognized request argument supplied"
ARGUMENTS = frozenset(CompletionCreateParamsBase.__annotations__) | {"stream"}
MAX_STOP = 4
RETENTIONS = ("in_memory", "24h")
# OpenAI's models that are no reasoning model: they refuse ``reasoning_effort``
_NOT_REASONING = re.compile(r"^(?:gpt-4o|gpt-4\.1|gpt-5-chat)(?:-|$)")


def _invalid(message: str, param: str | None, code: str | None = None) -> Reply:
    return error(400, "invalid_request_error", message, code=code, param=param)


# the longest tool call id OpenAI takes (vLLM's own, "chatcmpl-tool-" and 32 hex digits, is 46)
TOOL_CALL_ID_CHARS = 40


# the longest function description OpenAI takes (Anthropic takes longer ones: an MCP server's
# tools often have them)
TOOL_DESCRIPTION_CHARS = 1024


def _too_long(param: str, value: str, most: int = TOOL_CALL_ID_CHARS) -> Reply:
    return _invalid(
        f"Invalid '{param}': string too long. Expected a string with maximum length "
        f"{most}, but got a string with length {len(value)} instead.",
        param,
        "string_above_max_length",
    )


def _structure(model: str, body: dict[str, Any]) -> Reply | None:
    """The real API's 400 to a body it refuses, else None: (OpenAI's own models only) an
    argument it does not have, a function description over 1,024 characters; (any model) an
    output limit below 1 or both limits at once, a temperature outside [0, 2], more than 4
    stop sequences, an empty ``tools``, ``tool_choice`` or ``parallel_tool_calls`` without
    tools, a retention it does not know, ``reasoning_effort`` to a model that does not
    reason, no messages, or ``_conversation``'s refusals. Its words, as clients have met
    them."""
    own = bool(_OPENAI_MODEL.match(model))  # OpenAI's own model, not an engine's
    for name in body:
        if own and name not in ARGUMENTS:
            return _invalid(f"Unrecognized request argument supplied: {name}", None)
    if "max_tokens" in body and "max_completion_tokens" in body:
        return _invalid(
            "max_tokens and max_completion_tokens cannot both be set",
            "max_tokens",
            "invalid_parameter_combination",
        )
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if isinstance(value, int) and value < 1:
            return _invalid(
                f"Invalid '{name}': integer below minimum value. Expected a value >= 1, but "
                f"got {value} instead.",
                name,
                "integer_below_min_value",
            )
    temperature = body.get("temperature")
    if isinstance(temperature, int | float) and not 0 <= temperature <= 2:
        side, bound = (
            ("above", "maximum value. Expected a value <= 2")
            if temperature > 2
            else ("below", "minimum value. Expected a value >= 0")
        )
        return _invalid(
            f"Invalid 'temperature': decimal {side} {bound}, but got {temperature} instead.",
            "temperature",
            f"decimal_{side}_{'max' if side == 'above' else 'min'}_value",
        )
    stop = body.get("stop")
    if isinstance(stop, list) and len(stop) > MAX_STOP:
        return _invalid(
            f"Invalid 'stop': array too long. Expected an array with maximum length {MAX_STOP}, "
            f"but got an array with length {len(stop)} instead.",
            "stop",
            "array_above_max_length",
        )
    tools = body.get("tools")
    if isinstance(tools, list) and not tools:
        return _invalid(
            "Invalid 'tools': empty array. Expected an array with minimum length 1, but got an "
            "empty array instead.",
            "tools",
            "empty_array",
        )
    for i, tool in enumerate(tools if isinstance(tools, list) else ()):
        function = tool.get("function") if isinstance(tool, dict) else None
        described = function.get("description") if isinstance(function, dict) else None
        if own and isinstance(described, str) and len(described) > TOOL_DESCRIPTION_CHARS:
            return _too_long(f"tools[{i}].function.description", described, TOOL_DESCRIPTION_CHARS)
    for name in ("tool_choice", "parallel_tool_calls"):
        if body.get(name) is not None and not tools:
            return _invalid(
                f"Invalid value for '{name}': '{name}' is only allowed when 'tools' are specified.",
                name,
            )
    if (choice := _tool_choice_refusal(body.get("tool_choice"), tools)) is not None:
        return choice
    retention = body.get("prompt_cache_retention")
    if retention is not None and retention not in RETENTIONS:
        return _invalid(
            f"Invalid value: {retention!r}. Supported values are: 'in_memory' and '24h'.",
            "prompt_cache_retention",
            "invalid_value",
        )
    if body.get("reasoning_effort") is not None and _NOT_REASONING.match(model):
        return _invalid(
            "Unsupported parameter: 'reasoning_effort' is not supported with this model.",
            "reasoning_effort",
            "unsupported_parameter",
        )
    return _conversation(body.get("messages"), TOOL_CALL_ID_CHARS if own else None)


def _tool_choice_refusal(choice: Any, tools: Any) -> Reply | None:
    """OpenAI's 400 to a ``tool_choice`` it refuses: a string but none, auto or required; an
    object but ``{"type": "function", "function": {"name": ...}}`` (allowed_tools and custom
    are not served here); a named function none of the tools is. The words of the last are
    this server's (OpenAI's own were not on record here); the param is OpenAI's."""
    if choice is None:
        return None
    if isinstance(choice, str):
        if choice in ("none", "auto", "required"):
            return None
        return _invalid(
            f"Invalid value: {dumps(choice)}. Supported values are: 'none', 'auto', and "
            "'required'.",
            "tool_choice",
            "invalid_value",
        )
    function = choice.get("function") if isinstance(choice, dict) else None
    if (
        not isinstance(choice, dict)
        or choice.get("type") != "function"
        or not isinstance(function, dict)
        or not isinstance(function.get("name"), str)
    ):
        return _invalid("Invalid value for 'tool_choice'.", "tool_choice")
    names = [
        (tool.get("function") or {}).get("name") for tool in tools or [] if isinstance(tool, dict)
    ]
    if function["name"] not in names:
        return _invalid(
            f"Invalid value for 'tool_choice': function {dumps(function['name'])} is not "
            "among the tools.",
            "tool_choice.function.name",
        )
    return None


def _conversation(messages: Any, most_id_chars: int | None) -> Reply | None:
    """The real API's 400 to messages it refuses: none; an assistant message with neither
    content nor tool calls; a ``tool`` message that does not follow (after the other ``tool``
    messages) an assistant message with ``tool_calls``, or whose ``tool_call_id`` is none of
    that message's calls; an assistant message whose calls are not each answered by the
    ``tool`` messages that follow it, before any other message (or the request's end); a
    ``tool`` message answering a call another one already answered (OpenAI's "Duplicate value
    for 'tool_call_id'", as agno-agi/agno#5116 met it: a call id repeated in ``tool_calls``
    and answered each time too); a tool call id over ``most_id_chars`` (OpenAI's 40; None: an
    engine's, unbounded)."""
    if not isinstance(messages, list) or not messages:
        return _invalid(
            "Invalid 'messages': empty array. Expected an array with minimum length 1, but got "
            "an empty array instead.",
            "messages",
            "empty_array",
        )
    calls: dict[str, None] | None = None  # the open assistant message's unanswered call ids
    asked = -1  # that message's index
    open_ids: set[str] = set()  # its call ids
    answered: dict[str, int] = {}  # its calls answered so far: the tool message's index

    def unanswered() -> Reply:
        return _invalid(
            "An assistant message with 'tool_calls' must be followed by tool messages "
            "responding to each 'tool_call_id'. The following tool_call_ids did not have "
            f"response messages: {', '.join(calls or ())}",
            f"messages.[{asked}].role",
        )

    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role == "tool":
            if calls is None:
                return _invalid(
                    "Invalid parameter: messages with role 'tool' must be a response to a "
                    "preceeding message with 'tool_calls'.",
                    f"messages.[{i}].role",
                )
            call_id = message.get("tool_call_id")
            if most_id_chars is not None and len(str(call_id)) > most_id_chars:
                return _too_long(f"messages[{i}].tool_call_id", str(call_id))
            if call_id not in open_ids:
                return _invalid(
                    f"Invalid parameter: 'tool_call_id' of '{call_id}' not found in "
                    "'tool_calls' of previous message.",
                    f"messages.[{i}].tool_call_id",
                )
            if (first := answered.get(str(call_id))) is not None:
                return _invalid(
                    f"Invalid parameter: Duplicate value for 'tool_call_id' of '{call_id}', in "
                    f"messages[{first}] and messages[{i}].",
                    f"messages.[{i}].tool_call_id",
                )
            answered[str(call_id)] = i
            calls.pop(str(call_id), None)
            continue
        if calls:
            return unanswered()
        calls = None
        if role != "assistant":
            continue
        tool_calls = message.get("tool_calls")
        if tool_calls is not None and not tool_calls:
            return _invalid(
                f"Invalid 'messages[{i}].tool_calls': empty array. Expected an array with "
                "minimum length 1, but got an empty array instead.",
                f"messages[{i}].tool_calls",
                "empty_array",
            )
        # content null (or none) without tool calls is OpenAI's 400 (langchain-ai/langchainjs
        # #4153), with a refusal beside it too: its reference makes content "Required unless
        # `tool_calls` or `function_call` is specified" (a refused answer goes back as a
        # refusal content part, or content beside its refusal). The front is knowingly looser
        # (openai_api._answer_shape): it takes null without a refusal as an empty answer (the
        # Node SDK builds it from a streamed empty answer) and with one as the refusal's text.
        if message.get("content") is None and not tool_calls:
            return _invalid(
                "Invalid value for 'content': expected a string, got null.",
                f"messages.[{i}].content",
            )
        if tool_calls:
            ids = [str(call.get("id")) for call in tool_calls if isinstance(call, dict)]
            for j, call_id in enumerate(ids):
                if most_id_chars is not None and len(call_id) > most_id_chars:
                    return _too_long(f"messages[{i}].tool_calls[{j}].id", call_id)
            calls, asked, open_ids, answered = dict.fromkeys(ids), i, set(ids), {}
    if calls:
        return unanswered()
    return None


def forced_tool(body: dict[str, Any]) -> str | None:
    """The function a request's ``tool_choice`` forces (a named one; ``required``: the first
    tool), else None (``auto``, ``none``, no choice)."""
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        return str((choice.get("function") or {}).get("name"))
    if choice == "required":
        return str(((body.get("tools") or [{}])[0].get("function") or {}).get("name"))
    return None


def default(body: dict[str, Any]) -> Reply:
    """A short answer; a forced tool choice is answered with a call of that function, no text,
    finish_reason tool_calls for ``required`` and ``stop`` for a named function (OpenAI's own
    finish of a named choice's call, which the adapter reads as tool_use all the same)."""
    size = len(dumps(body.get("messages", [])))
    prompt = max(1, size // 4)
    forced = forced_tool(body)
    if forced is not None:
        call = ("call_LoopbackForced", forced, ["{}"])
        model = str(body.get("model"))
        finish = "tool_calls" if body.get("tool_choice") == "required" else "stop"
        return Reply(events=stream(model, [], usage(prompt, 0, 7), finish=finish, tool=call))
    return Reply(
        events=stream(
            str(body.get("model")), ["Paris is ", "the capital ", "of France."], usage(prompt, 0, 7)
        )
    )


def rejected(key_hint: str) -> Reply:
    """OpenAI's 401 echoes a masked key: the adapter must not repeat even that."""
    return error(
        401,
        "invalid_request_error",
        f"Incorrect API key provided: {key_hint}. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
        code="invalid_api_key",
    )
