"""A finished tool call's input: the JSON object the model wrote, or its text kept visibly;
and the stop reason a turn ends with, always one of the contract's."""

from __future__ import annotations

import json
import logging

import pytest

from services.model.providers.anthropic_wire import STOP_REASONS as ANTHROPIC_REASONS
from services.model.providers.openai_wire import stop_reason_of
from services.model.providers.progress import (
    MAX_UNKNOWN_LOGGED,
    contract_stop_reason,
    tool_use_chunk,
)

DEEP = '{"a": ' * 100_000 + "1" + "}" * 100_000


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
        # what Python's json reads but JSON has not: served, they failed the HTTP front (a lone
        # surrogate) or reached the SDK as a body it cannot send back (NaN)
        ('{"t": "smile \\ud83d"}', {"_unparsed_arguments": '{"t": "smile \\ud83d"}'}),
        ('{"t": NaN}', {"_unparsed_arguments": '{"t": NaN}'}),
        ('{"t": -Infinity}', {"_unparsed_arguments": '{"t": -Infinity}'}),
        ('{"t": 1e999}', {"_unparsed_arguments": '{"t": 1e999}'}),
        ('{"t": "\\ud83d\\ude00"}', {"t": "\U0001f600"}),  # an escaped pair is one character
        (DEEP, {"_unparsed_arguments": DEEP}),  # nested beyond what Python's json reads
    ],
)
def test_a_tool_calls_input_is_always_a_json_object(arguments: str, expected: object) -> None:
    use = tool_use_chunk("call_1", "weather", arguments).block.tool_use
    assert (use.id, use.name) == ("call_1", "weather")
    assert json.loads(use.input_json) == expected


@pytest.mark.parametrize(
    ("finish_reason", "called_tools", "expected"),
    [
        ("stop", False, "end_turn"),
        ("stop", True, "tool_use"),  # gpt-4o streaming and Ollama end a tool call so
        ("tool_calls", True, "tool_use"),
        ("function_call", True, "tool_use"),
        ("length", False, "max_tokens"),
        ("length", True, "max_tokens"),  # the call may be cut short: not a call to run
        ("content_filter", True, "refusal"),
        ("eos_token", False, "end_turn"),  # TGI before 2.2.1
        ("eos", False, "end_turn"),  # Together
        ("end", False, "end_turn"),
        ("stop_sequence", False, "end_turn"),
        ("eos", True, "tool_use"),
        ("abort", False, "max_tokens"),  # vLLM, SGLang: an aborted request, cut
        ("abort", True, "max_tokens"),
        ("a_reason_no_one_documents", False, "max_tokens"),  # nothing says it is whole
        ("a_reason_no_one_documents", True, "max_tokens"),
    ],
)
def test_an_openai_finish_reason_becomes_a_contract_stop_reason(
    finish_reason: str, called_tools: bool, expected: str
) -> None:
    assert stop_reason_of(finish_reason, called_tools) == expected


def test_an_unknown_stop_reason_is_max_tokens_logged_once_per_value_and_bounded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logged: set[tuple[str, str]] = set()
    with caplog.at_level(logging.WARNING, logger="cachemesh.model"):
        for _ in range(3):
            assert contract_stop_reason("anthropic", "new_reason", ANTHROPIC_REASONS, logged) == (
                "max_tokens"
            )
        assert contract_stop_reason("anthropic", "tool_use", ANTHROPIC_REASONS, logged) == (
            "tool_use"
        )
        for n in range(MAX_UNKNOWN_LOGGED + 10):
            contract_stop_reason("openai", f"engine_reason_{n}", {}, logged)
    lines = [r.getMessage() for r in caplog.records]
    assert len([line for line in lines if "'new_reason'" in line]) == 1
    assert len(lines) == MAX_UNKNOWN_LOGGED and "max_tokens" in lines[0]
