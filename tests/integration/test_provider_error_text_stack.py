"""A provider's rate-limit message naming the operator's organization, mid-answer, through the
whole stack (a model replica against the loopback provider, the router, the gRPC client): the
client's error names the status and type, never the organization (before: the router's "broke
off" refusal quoted OpenAI's message, "... in organization org-... on tokens per min (TPM):
Limit 200000, Used 199812 ..."); the replica's DEBUG line keeps the message, the id redacted."""

from __future__ import annotations

import time
import uuid

import pytest

from cachemesh import CachemeshError, Client
from tests.integration.provider_stack import ProviderStack, ask
from tests.integration.test_provider_error_text import ORG, RATE_LIMITED
from tests.providers import openai_wire
from tests.providers.wire_server import Reply

pytestmark = pytest.mark.integration


def test_a_rate_limit_mid_answer_reaches_the_tenant_without_the_organization(
    providers: ProviderStack,
) -> None:
    events = openai_wire.stream("gpt-4o-mini", ["Paris ", "is "], None)[:-2]
    broken = openai_wire.error_event("rate_limit_exceeded", 429, RATE_LIMITED).events
    providers.server.script("openai", Reply(events=events + broken))
    request = ask("gpt-4o-mini", f"Org check {uuid.uuid4().hex[:8]}")
    target, key = providers.stack.target, providers.stack.keys["tenant-a"]
    with (
        Client(target, api_key=key, max_attempts=1) as client,
        pytest.raises(CachemeshError) as caught,
    ):
        list(client.stream(request))
    told = str(caught.value)
    providers.errors.append(told)
    print(f"\n{told}")
    assert "broke off" in told and "rate_limit_exceeded (429)" in told
    assert ORG not in told and "Used 199812" not in told
    deadline = time.monotonic() + 5
    while True:  # the replica's line, written as the stream broke
        logs = "".join(p.read_text(errors="replace") for p in providers.log_dir.glob("*.log"))
        if "Rate limit reached for gpt-4o-mini" in logs or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert "Rate limit reached for gpt-4o-mini in organization [redacted]" in logs
    assert ORG not in logs
