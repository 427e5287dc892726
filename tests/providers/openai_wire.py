"""OpenAI Chat Completions' wire format, as https://platform.openai.com/docs/api-reference/chat
shows it: ``chat.completion.chunk`` objects (role chunk, content or tool_calls deltas, the
finish_reason chunk, the usage chunk with empty choices that ``stream_options.include_usage``
asks for), then ``data: [DONE]``; error bodies ``{"error": {message, type, param, code}}``."""

from __future__ import annotations

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
) -> Reply:
    return Reply(
        status=status,
        body={"error": {"message": message, "type": kind, "param": None, "code": code}},
        headers=headers or {},
    )


def error_event(kind: str, code: int | str, message: str) -> Reply:
    """An OpenAI-compatible engine's error inside a stream, before any token, as vLLM sends
    it (its ``ErrorResponse`` under ``error``, the HTTP status in ``code``): the answer's own
    status was already 200."""
    error = {"message": message, "type": kind, "param": None, "code": code}
    return Reply(events=[(None, dumps({"error": error}))])


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
