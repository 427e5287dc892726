"""What the official Node SDKs build from the fronts' streamed answers, recorded once with the
real SDK (it cannot run in the Python suite): a client replaying its own history sends these.

Recorded on 2026-12-07 with ``openai`` 5.23.2 (npm, Node 20): each answer's chunks below, as
the front's ``openai_api.ChunkStream`` made them (``include_usage`` false; the ``cachemesh``
facts field left out), fed as a byte stream to
``ChatCompletionStream.fromReadableStream(...).finalChatCompletion()``; the message is its
``choices[0].message``. The SDK adds a delta's content only when it is truthy, so the ``""``
delta that ends an empty answer is dropped and the message holds null
(tests/unit/test_http_front_translate.py checks the front still sends these chunks)."""

from __future__ import annotations

from typing import Any


def _chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-r1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "sim-small",
        "system_fingerprint": None,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }


def _empty_answer(finish: str) -> list[dict[str, Any]]:
    return [
        _chunk({"role": "assistant", "content": None, "refusal": None}, None),
        _chunk({"content": ""}, None),
        _chunk({}, finish),
    ]


# (the Gateway's stop reason, its text blocks, the front's chunks, the Node SDK's message)
Record = tuple[str, list[str], list[dict[str, Any]], dict[str, Any]]


def record_id(record: Record) -> str:
    """A record's name in a test's ids: its stop reason, and whether it had an empty text."""
    return f"{record[0]}{'+empty text' if record[1] else ''}"


OPENAI_NODE_EMPTY_ANSWERS: list[Record] = [
    (
        "end_turn",
        [],
        _empty_answer("stop"),
        {"role": "assistant", "content": None, "refusal": None, "parsed": None},
    ),
    (
        "max_tokens",
        [],
        _empty_answer("length"),
        {"role": "assistant", "content": None, "refusal": None, "parsed": None},
    ),
    (
        "refusal",
        [],
        _empty_answer("content_filter"),
        {"role": "assistant", "content": None, "refusal": None, "parsed": None},
    ),
    (
        "end_turn",
        [""],  # an empty text block: one "" delta, as an answer of none
        _empty_answer("stop"),
        {"role": "assistant", "content": None, "refusal": None, "parsed": None},
    ),
]
