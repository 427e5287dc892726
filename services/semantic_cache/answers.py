"""What the cache reads in an answer's content (a ``cachemesh.v1.CachedAnswer``) beyond its
record's fields: at Store, and again when an entry is loaded (``persistence``)."""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf.message import DecodeError

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import semantic_cache_pb2 as sc
from services.common import strict_json

# The key the model adapter keeps a tool call's arguments under when the model wrote them as
# no JSON object (``services/model/providers/progress.py``, ``tool_use_chunk``)
UNPARSED_ARGUMENTS = "_unparsed_arguments"


def unparsed_tool_call(content: Iterable[pb.ContentBlock]) -> bool:
    """A tool call of ``content`` whose arguments the model wrote as no JSON object (cut short,
    say): the adapter keeps them as ``{"_unparsed_arguments": <the text>}``; an input that is
    no standard JSON object (from before the adapter read them strictly) is one too, as the
    HTTP front reads it."""
    for block in content:
        if block.WhichOneof("kind") != "tool_use":
            continue
        value = strict_json.object_or_none(block.tool_use.input_json.strip() or "{}")
        if value is None or UNPARSED_ARGUMENTS in value:
            return True
    return False


def payload_has_unparsed_tool_call(payload: bytes) -> bool:
    """``unparsed_tool_call`` of a serialized ``CachedAnswer`` (one that does not parse, which
    no Store writes, holds none that can be read)."""
    try:
        answer = sc.CachedAnswer.FromString(payload)
    except DecodeError:
        return False
    return unparsed_tool_call(answer.content)
