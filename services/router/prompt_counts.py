"""A request's prompt counted once per vocabulary, whoever needs it first.

Under a token rate the limits count the prompt for its reservation; an L1 hit's usage and
``auto``'s context-window check while prefix-cache is down need the same count again. The
servicer opens a request's counts (``counting``) before its limits, and each of them counts
through ``count_prompt``: a vocabulary already counted for this request is not counted again.

The counts live in the request's context (its task's; the threads that count off the event
loop see them too) and serve only the request object they were opened for, so they never
reach another request; where none are open (the estimator, a pipeline on its own) each call
counts, as ``prompt_tokens`` does.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field

from cachemesh.v1 import gateway_pb2 as pb
from services.common.prompt import prompt_tokens
from services.common.tokens import Tokenizer


@dataclass
class _Counts:
    request: pb.CompleteRequest
    by_vocabulary: dict[str, int] = field(default_factory=dict)


_OPEN: ContextVar[_Counts | None] = ContextVar("cachemesh_prompt_counts", default=None)


def counting(request: pb.CompleteRequest) -> None:
    """Opens ``request``'s counts in the current context (the request's task)."""
    _OPEN.set(_Counts(request))


def count_prompt(request: pb.CompleteRequest, tokenizer: Tokenizer) -> int:
    """``prompt_tokens(request, tokenizer)``, counted once a vocabulary for an open request."""
    counts = _OPEN.get()
    if counts is None or counts.request is not request:
        return prompt_tokens(request, tokenizer)
    tokens = counts.by_vocabulary.get(tokenizer.name)
    if tokens is None:
        tokens = counts.by_vocabulary[tokenizer.name] = prompt_tokens(request, tokenizer)
    return tokens
