"""The OpenAI adapter's tool-call scan: when a call's streamed arguments close, read once a
character (a call whose pieces come under a new id each was re-joined and parsed whole at
every piece: 4.2 s of the model service's loop for 112 KB of arguments in 5-character
pieces), never fooled by brackets or quotes inside its strings."""

from __future__ import annotations

import pytest

from services.model.providers.openai_wire import ToolCall, ToolCalls


@pytest.mark.parametrize(
    ("pieces", "whole"),
    [
        (['{"a":', " 1}"], True),
        (['{"a": "}"'], False),  # a bracket inside a string
        (['{"a": "\\"}"', "}"], True),  # an escaped quote, then a bracket inside the string
        (['{"a": "\\\\"', "}"], True),  # an escaped backslash ends before the quote
        (['{"a": [1, {"b": 2}]'], False),
        (['{"a": [1, {"b": 2}]}'], True),
        (["[1, 2]"], True),
        ([""], False),
        ([], False),
    ],
)
def test_a_calls_arguments_are_whole_once_they_close(pieces: list[str], whole: bool) -> None:
    call = ToolCall()
    for piece in pieces:
        call.add(piece)
    assert call.whole() is whole
    assert "".join(call.pieces) == "".join(pieces)


def test_a_call_in_one_character_pieces_each_under_a_new_id_stays_one_call() -> None:
    arguments = '{"rows": [' + ", ".join(f'{{"n": {n}, "s": "x}}"}}' for n in range(2000)) + "]}"
    calls = ToolCalls()
    for n, char in enumerate(arguments):
        calls.piece(0, f"call_{n}", "put_rows" if n == 0 else None).add(char)
    (call,) = calls.calls
    assert call.whole() and "".join(call.pieces) == arguments
