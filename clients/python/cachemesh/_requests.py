"""Small builders for the Gateway's messages."""

from __future__ import annotations

from collections.abc import Sequence

from cachemesh.v1 import gateway_pb2 as pb


def user_message(text: str, *, cache: bool = False) -> pb.Message:
    block = pb.ContentBlock(text=text)
    if cache:
        block.cache_control.SetInParent()
    return pb.Message(role=pb.ROLE_USER, content=[block])


def assistant_message(text: str) -> pb.Message:
    return pb.Message(role=pb.ROLE_ASSISTANT, content=[pb.ContentBlock(text=text)])


def build_request(
    question: str,
    *,
    model: str = "auto",
    max_tokens: int = 512,
    system: str | None = None,
    history: Sequence[pb.Message] = (),
    namespace: str = "",
    threshold: float | None = None,
    semantic: pb.SemanticMode.ValueType = pb.SEMANTIC_MODE_UNSPECIFIED,
    temperature: float | None = None,
    request_id: str = "",
) -> pb.CompleteRequest:
    request = pb.CompleteRequest(
        model=model,
        max_tokens=max_tokens,
        messages=[*history, user_message(question)],
        request_id=request_id,
        cache=pb.CacheOptions(semantic=semantic, namespace=namespace),
    )
    if system:
        request.system.append(pb.ContentBlock(text=system))
    if threshold is not None:
        request.cache.threshold = threshold
    if temperature is not None:
        request.temperature = temperature
    return request


def answer_text(response: pb.CompleteResponse) -> str:
    return "".join(block.text for block in response.content if block.WhichOneof("kind") == "text")
