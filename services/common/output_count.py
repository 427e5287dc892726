"""The output tokens of an answer its provider did not count for us (cut by the model
service's output cut, interrupted, ended without an output count, or cut by the router or
left by its caller before its end came): the rule the model service and the router bill by."""

from __future__ import annotations


def streamed_output_tokens(counted: int, pieces: int) -> int:
    """Our tokenizer's ``counted`` of what the model wrote, or the non-empty ``pieces`` it was
    streamed in when they are more: each piece a provider streams is at least one of its
    tokens. A JSON-mode runaway of whitespace, 32 spaces a piece, counts a few tokens by our
    tokenizer but is a token a piece at the provider: its 1,281 pieces were billed our count,
    325 output tokens (195,000 nanos on gpt-4o-mini), now 1,281 (768,600)."""
    return max(counted, pieces)
