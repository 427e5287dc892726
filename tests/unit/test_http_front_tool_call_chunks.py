"""A streamed answer that begins with a tool call, in OpenAI's shape: its first chunk holds the
role and ``content: null`` (as OpenAI streams it), so the SDK's streamed message is the
non-streamed one (``content`` None, not ``""``); sent at the start, not held for the call."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import openai

from cachemesh.v1 import gateway_pb2 as pb
from tests.unit.test_http_front_app import ASK, KEY, FakeGateway, _answer, serving

CALL = pb.ContentBlock(tool_use=pb.ToolUse(id="toolu_1", name="lookup", input_json='{"id":"X1"}'))
TOOLS: list[Any] = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]


async def _chunks(base: str) -> list[dict[str, Any]]:
    """The stream's chunks as sent (``data:`` lines, but ``[DONE]``)."""
    body = {"model": "sim-large", "messages": ASK, "stream": True}
    headers = {"authorization": f"Bearer {KEY}"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{base}/v1/chat/completions", json=body, headers=headers) as reply,
    ):
        text = (await reply.read()).decode()
    lines = [line[len("data: ") :] for line in text.split("\n") if line.startswith("data: ")]
    return [json.loads(line) for line in lines if line != "[DONE]"]


async def _streamed(base: str) -> Any:
    """The openai SDK's streamed message of the answer (its ``get_final_completion``)."""
    gpt = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
    try:
        async with gpt.chat.completions.stream(
            model="sim-large", messages=ASK, tools=TOOLS
        ) as stream:
            return await stream.get_final_completion()
    finally:
        await gpt.close()


async def test_a_streamed_tool_call_answer_has_no_content_as_the_unstreamed_one(
    tmp_path: Path,
) -> None:
    fake = FakeGateway(answer=_answer(CALL, stop="tool_use"))
    async with serving(tmp_path, fake) as served:
        gpt = openai.AsyncOpenAI(base_url=f"{served.base}/v1", api_key=KEY, max_retries=0)
        try:
            plain = await gpt.chat.completions.create(model="sim-large", messages=ASK, tools=TOOLS)
        finally:
            await gpt.close()
        streamed = await _streamed(served.base)
        chunks = await _chunks(served.base)
    assert plain.choices[0].message.content is None
    message = streamed.choices[0].message
    assert message.content is None  # was "": the role chunk's empty text, sent before the call
    assert message.tool_calls is not None and message.tool_calls[0].function.name == "lookup"
    # the role first, no content (OpenAI's first chunk of such an answer), then the call
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": None, "refusal": None}
    assert deltas[1] == {
        "tool_calls": [
            {
                "index": 0,
                "id": "toolu_1",
                "type": "function",
                "function": {"name": "lookup", "arguments": '{"id":"X1"}'},
            }
        ],
    }
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "tool_calls"]


async def test_a_streamed_text_answer_begins_with_the_role_then_its_text(
    tmp_path: Path,
) -> None:
    """A text answer's first chunk is the role (``content: null``, which the SDKs accumulate
    as OpenAI's ``""``), then the text; a text before a call keeps the call in a chunk of its
    own."""
    fake = FakeGateway(answer=_answer(pb.ContentBlock(text="Checking."), CALL, stop="tool_use"))
    async with serving(tmp_path, fake) as served:
        chunks = await _chunks(served.base)
        streamed = await _streamed(served.base)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": None, "refusal": None}
    assert deltas[1] == {"content": "Checking."}
    assert [d.get("role") for d in deltas[2:]] == [None, None]
    assert deltas[2]["tool_calls"][0]["index"] == 0 and "content" not in deltas[2]
    assert streamed.choices[0].message.content == "Checking."
