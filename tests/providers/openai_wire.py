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


# OpenAI's own model ids: the loopback server stands for OpenAI-compatible engines too, which
# take other function names (llama-server, vLLM)
_OPENAI_MODEL = re.compile(r"^(?:gpt-|chatgpt-|o\d)")


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


def refusal(headers: dict[str, str], body: dict[str, Any]) -> Reply | None:
    """The real API's 400 to a request it refuses before answering, in its words, else None:
    a sampling setting other than its default, or ``max_tokens``, to a reasoning model;
    ``stream_options`` without ``stream``; a ``prompt_cache_key`` over 64 characters; a
    function name outside ``^[a-zA-Z0-9_-]+$`` or over 64 characters (OpenAI's own: an
    OpenAI-compatible engine takes others)."""
    if (named := _function_name_refusal(body)) is not None:
        return named
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


def default(body: dict[str, Any]) -> Reply:
    size = len(dumps(body.get("messages", [])))
    prompt = max(1, size // 4)
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
