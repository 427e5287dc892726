"""No provider key in any log line, error message, span or report, after runs that used the
keys (the billing and failure tests before this one, and this test's own calls, which include
a rejected key whose provider error echoes a masked form of it)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import uuid

import pytest

from cachemesh import CachemeshError, Client
from tests.integration.harness import ROOT, settled_spans
from tests.integration.provider_stack import ProviderStack, ask
from tests.providers import anthropic_wire, openai_wire

pytestmark = pytest.mark.integration


def _fragments(key: str) -> list[str]:
    """The key, and the head and tail a provider's message shows of it."""
    return [key, key[:8] + "*", key[-6:]]


def test_no_key_in_logs_errors_spans_or_reports(providers: ProviderStack) -> None:
    before = {s.span_id for s in providers.stack.sink.all_spans()}
    with Client(providers.stack.target, api_key=providers.stack.keys["tenant-a"]) as client:
        for model in ("claude-haiku-4-5", "claude-sonnet-4-5", "gpt-4-1", "gpt-4o-mini"):
            client.complete(ask(model, f"Key check {model} {uuid.uuid4().hex[:6]}"))
        key = providers.keys["openai-1"]
        # a 400 whose message echoes the masked key, as OpenAI's messages do
        echo = openai_wire.error(
            400, "invalid_request_error", f"Bad request for key {key[:8]}****{key[-4:]}"
        )
        providers.server.script("openai", echo)
        with pytest.raises(CachemeshError) as caught:  # a provider error reaches the client
            client.complete(ask("gpt-4o-mini", f"Masked key echo {uuid.uuid4().hex[:6]}"))
        providers.errors.append(str(caught.value))
        # a 403 whose error type names the key it was sent, as a proxy's own type may: short
        # enough to pass as an identifier, so only the redactor keeps it out
        anthropic_key = providers.keys["anthropic-1"]
        named = anthropic_wire.error(403, f"forbidden_for_{anthropic_key}", "Forbidden")
        providers.server.script("anthropic", dataclasses.replace(named, key=anthropic_key))
        try:
            client.complete(ask("claude-sonnet-4-5", f"Typed key echo {uuid.uuid4().hex[:6]}"))
        except CachemeshError as refused:
            providers.errors.append(str(refused))
    report = providers.run_dir / "loadtest.json"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "cachemesh.loadtest",
            "--target",
            providers.stack.target,
            "--workload",
            "synthetic",
            "--requests",
            "4",
            "--concurrency",
            "2",
            "--stream",
            "--out",
            str(report),
        ],
        cwd=ROOT,
        env={
            **os.environ,
            "CACHEMESH_KEY_A": providers.stack.keys["tenant-a"],
            "CACHEMESH_KEY_B": providers.stack.keys["tenant-b"],
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    texts = {
        path.name: path.read_text(errors="replace") for path in providers.log_dir.glob("*.log")
    }
    texts["errors"] = "\n".join(providers.errors)
    texts["spans"] = json.dumps(
        [
            (s.service, s.name, s.attributes, s.events, s.status_message)
            # every span of this test's 10 requests (6 calls here, 4 by the load tester)
            for s in settled_spans(providers.stack.sink, before, 6 + 4)
        ],
        default=str,
    )
    texts["loadtest.json"] = report.read_text()
    assert json.loads(texts["loadtest.json"])["results"]["ttft_ms"]  # TTFT in the report
    assert "anthropic" in texts["spans"] and len(texts["errors"]) > 0  # keys were used
    for name, key in providers.keys.items():
        for fragment in _fragments(key):
            leaks = [where for where, text in texts.items() if fragment in text]
            assert not leaks, f"{name}'s key ({len(fragment)} characters of it) in {leaks}"
