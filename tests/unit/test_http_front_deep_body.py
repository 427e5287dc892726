"""A body nested deeper than Python's json reads (~1,000 levels, a tool's schema) is refused
with the router's too-deep rule and the member it is in, not "maximum recursion depth"."""

from __future__ import annotations

import json

import pytest

from services.common.strict_json import MAX_DEEP_PATH_STEPS, MAX_DEPTH, deep_path
from services.http_front.errors import ApiError
from services.http_front.fields import parse_body


def _schema(levels: int) -> str:
    return '{"type": "object", "properties": {"a": ' * levels + "{}" + "}}" * levels


def test_a_tool_schema_deeper_than_json_reads_is_too_deep_in_its_member() -> None:
    body = (
        '{"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}],'
        ' "tools": [{"name": "ok", "input_schema": {}}, {"name": "f", "input_schema": '
        + _schema(1_000)
        + "}]}"
    )
    with pytest.raises(ApiError) as refused:
        parse_body(body.encode(), "anthropic")
    message = refused.value.message
    assert "recursion" not in message
    assert message == (
        f"tools.1.input_schema: must be JSON nested at most {MAX_DEPTH} levels deep (objects"
        " and arrays), got one nested deeper"
    )
    assert refused.value.param == "tools.1.input_schema"


def test_deep_arrays_name_the_field_they_are_in() -> None:
    with pytest.raises(ApiError) as refused:
        parse_body(b'{"metadata": ' + b"[" * 5_000 + b"]" * 5_000 + b"}", "anthropic")
    assert refused.value.message.startswith("metadata: must be JSON nested at most 128")


def test_an_openai_deep_tool_schema_names_its_field_as_openai_does() -> None:
    """It said ``tools.0.function`` (dot style, cut to three names); the front's other OpenAI
    errors say ``tools[0].function.parameters``."""
    body = (
        '{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type":'
        ' "function", "function": {"name": "f", "parameters": ' + _schema(1_000) + "}}]}"
    )
    with pytest.raises(ApiError) as refused:
        parse_body(body.encode(), "openai")
    assert refused.value.param == "tools[0].function.parameters"
    assert refused.value.message.startswith("tools[0].function.parameters: must be JSON nested")


def test_deep_path_skips_a_long_string_whole_and_bounds_its_steps() -> None:
    """It walked the text char by char in Python (12.6 MB: 2.1 s); a string is one step now,
    and past ``MAX_DEEP_PATH_STEPS`` steps it names no place (the message says "the request
    body") rather than walk on."""
    deep = "[" * 1_100 + "]" * 1_100
    long_string = '{"m": "' + "x" * 5_000_000 + '", "metadata": ' + deep + "}"
    assert deep_path(long_string) == ["metadata"] + [0] * (MAX_DEPTH - 1)
    members = '{"role": "user", "content": "a"}, ' * (MAX_DEEP_PATH_STEPS // 2 + 1)
    many = '{"messages": [' + members + '{}], "metadata": ' + deep + "}"
    assert deep_path(many) is None
    with pytest.raises(ApiError) as refused:
        parse_body(many.encode(), "openai")
    assert refused.value.message.startswith("the request body: must be JSON nested at most")
    assert refused.value.param is None


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ({"a": [1, {"b": "x"}, [[[]]]]}, ["a", 2, 0]),
        ({'k"}{[': "]]", "n": {"m": [[[]]]}}, ["n", "m", 0]),
        ({"a": {"b": {}}}, None),
        ({"a": {"b": {"c": [1, "]"]}}}, ["a", "b", "c"]),  # one holding no other opens deep too
        ([0, 1, [[[[]]]]], [2, 0, 0]),
        ({"a": [{"x": 1}, {"y": '\\"['}, {"z": [[[{}]]]}]}, ["a", 2, "z"]),
    ],
)
def test_deep_path_names_the_first_member_opened_too_deep(
    value: object, path: list[str | int] | None
) -> None:
    assert deep_path(json.dumps(value), limit=3) == path
