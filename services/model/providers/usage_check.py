"""The token counts a provider reports, checked before a bill believes them.

A provider's usage is the bill (prefix-cache reconciles its estimate to it), and a bill is
exact (under 2**53 nano-dollars, where the limits' Redis adds it in Lua doubles) only while
each count stays within what a request of the row can reach. An OpenAI-compatible engine or
a proxy in front of a provider can report anything: a negative count (billed 0, or refused by
prefix-cache and the bill lost), a fraction or a text (a call failed after its answer
streamed), 10**12 tokens. A count no call can have is not believed: the call is billed as if
that count had not been reported (the adapters' convention for a null count: Plan's count of
the prompt, the replica's own count of the output), the end names the field
(``GenerateEnd.distrusted_usage``), the replica counts it
(``cachemesh_model_provider_usage_distrusted_total``) and logs one line naming the fields and
why, never the value (a proxy may echo anything).
"""

from __future__ import annotations

from services.common.env import MAX_TOKENS
from services.common.models import ModelSpec

# A count past this many times a row's reach (its context window plus its output cap) is no
# call's: the configured window may be smaller than the engine's (CACHEMESH_CONTEXT_WINDOWS)
# and a provider's tokenizer not ours, but not by ten times. Never past MAX_TOKENS either,
# which keeps a request's bill under 2**53 nano-dollars (services.common.env).
REACH_FACTOR = 10


def most_tokens(spec: ModelSpec) -> int:
    """The largest count of one kind (a prompt's, its cache reads, an output) believed for a
    call of ``spec``'s row."""
    return min(REACH_FACTOR * (spec.context_window_tokens + spec.max_output_tokens), MAX_TOKENS)


def token_count(value: object, most: int) -> tuple[int | None, str]:
    """``value`` (as the SDK holds the JSON: it does not check it) as a token count: (the
    count, "") if a call can have it, 0 to ``most``; else (None, why, without the value)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None, f"not a number ({type(value).__name__})"
    if isinstance(value, float) and not value.is_integer():  # NaN and infinity too
        return None, "not a whole number"
    count = int(value)
    if count < 0:
        return None, "negative"
    if count > most:
        return None, f"past {most:,}, more than any call of the model"
    return count, ""


def believed_count(name: str, value: object, most: int, distrusted: dict[str, str]) -> int:
    """A usage count as reported (None: not reported, 0); one no call has (``token_count``)
    is 0 too, and named ``name`` in ``distrusted``."""
    if value is None:
        return 0
    count, why = token_count(value, most)
    if count is None:
        distrusted[name] = why
        return 0
    return count
