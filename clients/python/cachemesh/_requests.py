"""Small builders for the Gateway's messages. A parameter of the wrong type or out of its
field's range is a TypeError or a ValueError naming it, before anything is sent (protobuf's
own named nothing: "bad argument type for built-in operation", "Value out of range: ...");
text that cannot be UTF-8 (a lone surrogate, from bytes decoded with ``surrogateescape``) is a
ValueError naming the parameter, never showing the text (a question may be private)."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

from cachemesh.v1 import gateway_pb2 as pb

INT32 = (-(2**31), 2**31 - 1)  # max_tokens is an int32 field


def _text(parameter: str, value: object) -> str:
    """``value`` when it is a str that UTF-8 can carry; else a TypeError or ValueError naming
    ``parameter`` (never the text)."""
    if not isinstance(value, str):
        raise TypeError(f"{parameter} must be a str, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"{parameter} is not valid UTF-8 text (a lone surrogate at position {error.start}: "
            "bytes decoded with errors='surrogateescape'? decode them with their real encoding)"
        ) from None
    return value


def _unset_or_text(parameter: str, value: object) -> str:
    """An optional field's text: None is unset (``""``), as protobuf took it before these
    checks (``request_id=os.environ.get(...)`` of an unset variable)."""
    return "" if value is None else _text(parameter, value)


def _int32(parameter: str, value: object) -> int:
    """``value`` when it is a whole number (not a bool) an int32 field holds; else a TypeError
    or ValueError naming ``parameter``. What the field means (max_tokens over 0) is the
    Gateway's to check: its INVALID_ARGUMENT names the field too."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{parameter} must be an int, got {type(value).__name__}")
    number = int(value)
    if not INT32[0] <= number <= INT32[1]:
        raise ValueError(
            f"{parameter} must be an int32, from {INT32[0]:,} to {INT32[1]:,}, got {number}"
        )
    return number


def _real(parameter: str, value: object) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{parameter} must be a number, got {type(value).__name__}")
    return float(value)


def user_message(text: str, *, cache: bool = False) -> pb.Message:
    block = pb.ContentBlock(text=_text("text", text))
    if cache:
        block.cache_control.SetInParent()
    return pb.Message(role=pb.ROLE_USER, content=[block])


def assistant_message(text: str) -> pb.Message:
    return pb.Message(role=pb.ROLE_ASSISTANT, content=[pb.ContentBlock(text=_text("text", text))])


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
    """A request of one user ``question`` after ``history``; a value of a field's type is
    the Gateway's to check (max_tokens 0, an unknown model, a threshold outside [0, 1]: an
    ``InvalidRequestError`` naming the field)."""
    request = pb.CompleteRequest(
        model=_text("model", model),
        max_tokens=_int32("max_tokens", max_tokens),
        messages=[
            *history,
            pb.Message(
                role=pb.ROLE_USER, content=[pb.ContentBlock(text=_text("question", question))]
            ),
        ],
        request_id=_unset_or_text("request_id", request_id),
        cache=pb.CacheOptions(semantic=semantic, namespace=_unset_or_text("namespace", namespace)),
    )
    if system:
        request.system.append(pb.ContentBlock(text=_text("system", system)))
    if threshold is not None:
        request.cache.threshold = _real("threshold", threshold)
    if temperature is not None:
        request.temperature = _real("temperature", temperature)
    return request


def answer_text(response: pb.CompleteResponse) -> str:
    return "".join(block.text for block in response.content if block.WhichOneof("kind") == "text")
