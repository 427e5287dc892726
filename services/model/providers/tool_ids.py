"""The tool ids of a request as a provider is sent them: the one rule both adapters use.

A provider bounds the tool call ids it takes (Anthropic's pattern ``[a-zA-Z0-9_-]+``, OpenAI's
40 characters), while a conversation may hold ids another model wrote (an OpenAI-compatible
engine's ``functions.calc:0``, vLLM's 46-character ``chatcmpl-tool-...``) or a client's own.
``tool_ids`` maps each id of the request to the id sent for it, one to one within the request:
an id the provider takes is sent as it is; another as the adapter's rewrite of it, the next
candidate while that one is already taken (an id of the request that is literally another's
rewrite, or two rewrites meeting). The same id on a call and on its result, so each result
still names its call; the rewrite depends on the request alone, so a conversation's earlier
turns go the same on its later turns (the provider's prompt cache sees the same prefix).
"""

from __future__ import annotations

from collections.abc import Callable

from cachemesh.v1 import gateway_pb2 as pb

# (call_id, n) -> the n-th id to try for call_id (n = 1, 2, ...); each one the provider takes
Rewrite = Callable[[str, int], str]


def request_ids(request: pb.CompleteRequest) -> list[str]:
    """The request's tool ids (its calls' and its results'), in their order, repeats kept."""
    seen: list[str] = []
    for message in request.messages:
        for block in message.content:
            kind = block.WhichOneof("kind")
            if kind == "tool_use":
                seen.append(block.tool_use.id)
            elif kind == "tool_result":
                seen.append(block.tool_result.tool_use_id)
    return seen


def tool_ids(
    request: pb.CompleteRequest, fits: Callable[[str], bool], rewrite: Rewrite
) -> dict[str, str]:
    """Each tool id of ``request`` -> the id sent for it, one to one: an id that ``fits`` is
    itself; another is ``rewrite(id, 1)``, else ``rewrite(id, 2)`` ... the first not taken by
    an id of the request or an earlier rewrite. A rewrite that does not fit is a ValueError
    (the adapter's fault: the provider would refuse it)."""
    seen = request_ids(request)
    ids = {call_id: call_id for call_id in seen if fits(call_id)}
    taken = set(ids)
    for call_id in seen:
        if call_id in ids:
            continue
        n = 1
        while (candidate := rewrite(call_id, n)) in taken:
            n += 1
        if not fits(candidate):
            raise ValueError(f"the rewrite of tool id {call_id!r} does not fit: {candidate!r}")
        ids[call_id] = candidate
        taken.add(candidate)
    return ids
