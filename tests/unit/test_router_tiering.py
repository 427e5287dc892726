"""The auto tier policy: each decision comes with its reason."""

from __future__ import annotations

from cachemesh.v1 import gateway_pb2 as pb
from services.router.tiering import choose_tier


def _ask(text: str, tools: int = 0) -> pb.CompleteRequest:
    return pb.CompleteRequest(
        model="auto",
        max_tokens=100,
        tools=[pb.Tool(name=f"t{i}") for i in range(tools)],
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=text)])],
    )


def test_short_plain_question_goes_small() -> None:
    choice = choose_tier(_ask("How do I reset my password?"))
    assert choice.tier == "small" and choice.reason


def test_tools_go_large() -> None:
    assert choose_tier(_ask("Book it", tools=2)).tier == "large"


def test_reasoning_cue_goes_large() -> None:
    choice = choose_tier(_ask("Explain why the sky is blue, step by step."))
    assert choice.tier == "large" and "reasoning" in choice.reason


def test_long_question_goes_large() -> None:
    assert choose_tier(_ask("word " * 200)).tier == "large"
