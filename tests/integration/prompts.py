"""Requests shared by the integration tests."""

from __future__ import annotations

from cachemesh.demo import workload
from cachemesh.v1 import gateway_pb2 as pb


def agent_request(
    marker: str, user_turns: list[str], answers: list[str] | tuple[str, ...] = ()
) -> pb.CompleteRequest:
    """The demo agent's tools and system prompt (over 1,024 tokens, cache_control marked),
    made unique by ``marker`` so tests do not read each other's prefixes."""
    system = pb.ContentBlock(text=f"Session {marker}.\n\n{workload.SYSTEM_PROMPT}")
    system.cache_control.SetInParent()
    messages: list[pb.Message] = []
    for i, turn in enumerate(user_turns):
        messages.append(pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=turn)]))
        if i < len(answers):
            messages.append(
                pb.Message(role=pb.ROLE_ASSISTANT, content=[pb.ContentBlock(text=answers[i])])
            )
    messages[-1].content[-1].cache_control.SetInParent()
    return pb.CompleteRequest(
        model="sim-large",
        max_tokens=200,
        tools=workload.TOOLS,
        system=[system],
        messages=messages,
    )
