"""A finished tool call's input: the JSON object the model wrote, or its text kept visibly."""

from __future__ import annotations

import json

import pytest

from services.model.providers.progress import tool_use_chunk


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ('{"city": "Paris"}', {"city": "Paris"}),
        ("", {}),
        ("  ", {}),
        ('{"city": "Par', {"_unparsed_arguments": '{"city": "Par'}),  # cut short
        ("null", {"_unparsed_arguments": "null"}),  # JSON, but not a tool's input
        ("[1, 2]", {"_unparsed_arguments": "[1, 2]"}),
        ('"Paris"', {"_unparsed_arguments": '"Paris"'}),
    ],
)
def test_a_tool_calls_input_is_always_a_json_object(arguments: str, expected: object) -> None:
    use = tool_use_chunk("call_1", "weather", arguments).block.tool_use
    assert (use.id, use.name) == ("call_1", "weather")
    assert json.loads(use.input_json) == expected
