"""A body neither adapter can build or its SDK encode (NaN in a tool schema, a lone surrogate)
is ``Unsendable`` before any byte is sent, through one helper (``failures.never_sent``): the
request's fault, never the replica's. The SDKs' base URL is a closed loopback port: reaching
it would fail otherwise (a connection error, which is the replica's)."""

from __future__ import annotations

import anthropic
import openai
import pytest

from cachemesh import build_request
from cachemesh.v1 import gateway_pb2 as pb
from services.common.models import load_model_table
from services.model.providers.anthropic_wire import AnthropicAdapter
from services.model.providers.failures import Kind, Unsendable, classify, never_sent
from services.model.providers.openai_wire import OpenAIAdapter
from services.model.providers.progress import Progress

CLOSED = "http://127.0.0.1:1"
TABLE = load_model_table()
SCHEMAS = {
    "NaN": '{"type": "object", "properties": {"n": {"type": "number", "maximum": NaN}}}',
    "lone surrogate": '{"type": "object", "description": "cut \\ud83d"}',
    # deeper than the adapter's json.loads (or the SDK's encoder) recurses: RecursionError
    "nested too deeply": '{"type": "object", "properties": ' + '{"a": ' * 5000 + "1" + "}" * 5001,
}


def test_never_sent_turns_an_encoding_error_into_unsendable_and_lets_others_pass() -> None:
    refused = pytest.raises(Unsendable, match="ValueError: Out of range float values")
    with refused as caught, never_sent():
        raise ValueError("Out of range float values are not JSON compliant")
    assert classify(caught.value).kind == Kind.CLIENT
    with pytest.raises(KeyError), never_sent():
        raise KeyError("not an encoding error")
    with pytest.raises(Unsendable, match="RecursionError"), never_sent():
        raise RecursionError("maximum recursion depth exceeded while encoding a JSON object")


def _adapters() -> dict[str, AnthropicAdapter | OpenAIAdapter]:
    return {
        "claude-sonnet-4-5": AnthropicAdapter(
            anthropic.AsyncAnthropic(api_key="none", base_url=CLOSED, max_retries=0)
        ),
        "gpt-4-1": OpenAIAdapter(
            openai.AsyncOpenAI(api_key="none", base_url=CLOSED, max_retries=0)
        ),
    }


@pytest.mark.parametrize("model", ["claude-sonnet-4-5", "gpt-4-1"])
@pytest.mark.parametrize("what", list(SCHEMAS))
async def test_each_adapter_refuses_a_body_it_cannot_send_as_unsendable(
    model: str, what: str
) -> None:
    adapter = _adapters()[model]
    request = build_request("Hi?", model=model)
    request.tools.append(pb.Tool(name="get", description="d", input_schema_json=SCHEMAS[what]))
    progress = Progress(replica="r", backend=adapter.backend, estimated_prompt_tokens=3)
    try:
        with pytest.raises(Unsendable):
            async for _ in adapter.stream(TABLE.models[model], request, progress, 5.0):
                pass
    finally:
        await adapter.close()
