"""A provider's error text that quotes the request (OpenAI's 400 naming the bad content, a
vLLM or llama.cpp parse error repeating the prompt) stays out of every log line above DEBUG
and every span, through the whole stack (the loopback provider, a model replica, the router,
the gRPC client): above DEBUG a replica logs the provider's identifiers only (status, error
type, code, param, its request id), the provider's own message at DEBUG; the spans' status
descriptions follow the same rule. The caller's own error may quote it (its own prompt).

Before: a 400 quoting a marker of the prompt put it in the replica's WARNING line and in the
router's Generate span's status description (1 line, 1 span); a 500 quoting it, in the
replica's WARNING line, the replica's Generate span and the router's (its description and
its exception event)."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from cachemesh import CachemeshError, Client
from tests.integration.harness import settled_spans
from tests.integration.provider_stack import ProviderStack, ask
from tests.providers import openai_wire

pytestmark = pytest.mark.integration
MODEL = "gpt-4o-mini"  # served by openai-1 alone


def _lines_above_debug(providers: ProviderStack, marker: str) -> list[str]:
    found: list[str] = []
    for path in providers.log_dir.glob("*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if marker not in line:
                continue
            try:
                level = json.loads(line).get("level")
            except ValueError:
                level = None  # not a JSON line (a traceback's): counted
            if level != "DEBUG":
                found.append(f"{path.name}: {line}")
    return found


def _debug_lines(providers: ProviderStack, marker: str) -> list[str]:
    return [
        line
        for path in providers.log_dir.glob("*.log")
        for line in path.read_text(errors="replace").splitlines()
        if marker in line and '"level":"DEBUG"' in line
    ]


def _spans_holding(providers: ProviderStack, marker: str, before: set[str]) -> list[str]:
    """The spans holding ``marker``, once every span of the one request asked since the spans
    ``before`` has reached the sink (not after a sleep: a span exported late went unread)."""
    return [
        f"{s.service} {s.name}"
        for s in settled_spans(providers.stack.sink, before, 1)
        if marker in json.dumps([s.attributes, s.events, s.status_message], default=str)
    ]


def _wait_for_lines(providers: ProviderStack, marker: str) -> None:
    """A replica's line with the provider's message: its lines are written."""
    deadline = time.monotonic() + 10
    while not any(
        marker in path.read_text(errors="replace") for path in providers.log_dir.glob("*.log")
    ):
        assert time.monotonic() < deadline, "no line with the provider's message"
        time.sleep(0.1)


def _asked(providers: ProviderStack, marker: str) -> str:
    request = ask(MODEL, f"Check this: {marker}")
    target, key = providers.stack.target, providers.stack.keys["tenant-a"]
    with (
        Client(target, api_key=key, max_attempts=1) as client,
        pytest.raises(CachemeshError) as caught,
    ):
        client.complete(request)
    told = str(caught.value)
    providers.errors.append(told)
    return told


def test_a_400_quoting_the_prompt_is_in_no_line_above_debug_nor_any_span(
    providers: ProviderStack,
) -> None:
    marker = f"marker-{uuid.uuid4().hex}"
    refusal = openai_wire.error(
        400,
        "invalid_request_error",
        f"Invalid 'messages[0].content': the string 'Check this: {marker}' is not valid.",
        code="invalid_value",
        param="messages[0].content",
    )
    refusal.key = providers.keys["openai-1"]
    providers.server.script("openai", refusal)
    before = {s.span_id for s in providers.stack.sink.all_spans()}
    told = _asked(providers, marker)
    print(f"\ntold: {told}")
    assert "INVALID_ARGUMENT" in told and marker in told  # the caller's own prompt: kept
    _wait_for_lines(providers, marker)
    lines, spans = _lines_above_debug(providers, marker), _spans_holding(providers, marker, before)
    print(f"lines above DEBUG: {len(lines)}, spans: {len(spans)} {spans}")
    assert lines == [] and spans == []
    assert _debug_lines(providers, marker)
    assert _debug_lines(providers, marker)  # the operator reads the message at DEBUG
    logged = "".join(p.read_text(errors="replace") for p in providers.log_dir.glob("*.log"))
    # the identifiers are on the replica's WARNING line
    warned = [
        line
        for line in logged.splitlines()
        if '"level":"WARNING"' in line
        and "invalid_value" in line
        and "param messages[0].content" in line
    ]
    assert warned, "no WARNING line with the provider's identifiers"


def test_a_500_quoting_the_prompt_is_in_no_line_above_debug_nor_any_span(
    providers: ProviderStack,
) -> None:
    marker = f"marker-{uuid.uuid4().hex}"
    key = providers.keys["openai-1"]
    for _ in range(3):  # the first try and PROVIDER_MAX_RETRIES (2)
        failure = openai_wire.error(
            500, "server_error", f"failed to parse the prompt 'Check this: {marker}'"
        )
        failure.key = key
        providers.server.script("openai", failure)
    before = {s.span_id for s in providers.stack.sink.all_spans()}
    told = _asked(providers, marker)
    print(f"\ntold: {told}")
    assert "UNAVAILABLE" in told and marker not in told
    _wait_for_lines(providers, marker)
    lines, spans = _lines_above_debug(providers, marker), _spans_holding(providers, marker, before)
    print(f"lines above DEBUG: {len(lines)}, spans: {len(spans)} {spans}")
    assert lines == [] and spans == []
    assert _debug_lines(providers, marker)
