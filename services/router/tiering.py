"""Which tier answers an ``auto`` request: a simple policy whose every decision has a reason.

The calibrated router comes later; this one sends a request to the large model when the task
looks hard by its shape (tools to call, long context, a long question) or by its words (asks
for reasoning, proof, code or calculation), and to the small model otherwise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cachemesh.v1 import gateway_pb2 as pb
from services.common.models import Tier
from services.common.prompt import block_text, last_user_text

LONG_CONTEXT_CHARS = 12_000
LONG_QUESTION_CHARS = 600
_HARD_WORDS = re.compile(
    r"\b(prove|proof|derive|step[- ]by[- ]step|analy[sz]e|compare|debug|refactor|implement|"
    r"algorithm|calculate|compute|optimi[sz]e|explain why|trade-?offs?|write (a|the) (code|"
    r"function|program|script))\b",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class TierChoice:
    tier: Tier
    reason: str


def choose_tier(request: pb.CompleteRequest) -> TierChoice:
    if request.tools:
        return TierChoice("large", f"{len(request.tools)} tools offered: agent work")
    context = sum(len(block_text(b)) for m in request.messages for b in m.content)
    context += sum(len(block_text(b)) for b in request.system)
    if context > LONG_CONTEXT_CHARS:
        return TierChoice("large", f"long context ({context} chars > {LONG_CONTEXT_CHARS})")
    question = last_user_text(request) or ""
    if len(question) > LONG_QUESTION_CHARS:
        return TierChoice("large", f"long question ({len(question)} chars)")
    match = _HARD_WORDS.search(question)
    if match:
        return TierChoice("large", f"asks for reasoning ({match.group(0)!r})")
    return TierChoice("small", "short question, no tools, no reasoning cue")
