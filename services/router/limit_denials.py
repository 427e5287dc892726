"""A request refused by its limits (``Denial``): the limit it waits longest for, and the
message that tells its caller what it is over, by how much, and when to retry."""

from __future__ import annotations

from dataclasses import dataclass

from services.router.limit_policy import (
    DAY_BUDGET,
    MONTH_BUDGET,
    NANOS_PER_DOLLAR,
    REQUESTS,
    TOKENS,
    LimitPolicy,
    Refusal,
)


@dataclass(frozen=True)
class Denial:
    """A request refused by its limits: the one it waits longest for, the message for the
    caller, the wait; ``exceeded``: every limit it is over, longest wait first."""

    limit: str
    message: str
    retry_after_ms: int
    exceeded: tuple[str, ...]


def denial(
    refusal: Refusal, policy: LimitPolicy, prompt: int, max_tokens: int, output: int | None = None
) -> Denial:
    """``output``: what the request reserves of its output (None: its ``max_tokens``)."""
    message = _message(
        refusal, policy, prompt, max_tokens, max_tokens if output is None else output
    )
    return Denial(refusal.limit, message, refusal.wait_ms, (refusal.limit, *refusal.also))


_NAMES = {
    REQUESTS: "request rate",
    TOKENS: "token rate",
    DAY_BUDGET: "daily budget",
    MONTH_BUDGET: "monthly budget",
}


def _message(
    refusal: Refusal, policy: LimitPolicy, prompt: int, max_tokens: int, output: int
) -> str:
    said = _over(refusal, policy, prompt, max_tokens, output)
    if not refusal.also:
        return said
    return f"{said} (this tenant is over its {' and '.join(_NAMES[x] for x in refusal.also)} too)"


def _over(refusal: Refusal, policy: LimitPolicy, prompt: int, max_tokens: int, output: int) -> str:
    """What the limit with the longest wait says; ``output``: what the request reserves of its
    output (its ``max_tokens``, or more on a row thinking outside it)."""
    wait = _seconds(refusal.wait_ms)
    if refusal.limit == REQUESTS:
        return (
            f"rate limit: this tenant may send {policy.requests_per_min} requests a minute; "
            f"retry in {wait}"
        )
    if refusal.limit == TOKENS:
        assert policy.tokens_per_min is not None
        reserve = prompt + output
        writes = (
            f"max_tokens {max_tokens}"
            if output == max_tokens
            else f"the {output} output tokens its model can write, thinking outside max_tokens"
        )
        said = (
            f"rate limit: this tenant may use {policy.tokens_per_min} tokens a minute; this "
            f"request reserves {reserve} tokens until it ends (its prompt's {prompt} and "
            f"{writes})"
        )
        if reserve > policy.tokens_per_min:
            return (
                f"{said}, more than a minute's: it is admitted only when all "
                f"{policy.tokens_per_min} are free; retry in {wait}"
            )
        if refusal.free_tokens > 0 and not refusal.also:  # else a smaller one is refused too
            return (
                f"{said} and {refusal.free_tokens} are free now; retry in {wait}, or send a "
                f"request of at most {refusal.free_tokens} tokens (prompt and max_tokens)"
            )
        return f"{said}; retry in {wait}"
    if refusal.holding and refusal.limit in (DAY_BUDGET, MONTH_BUDGET):
        budget = (
            policy.day_budget_nanos if refusal.limit == DAY_BUDGET else policy.month_budget_nanos
        )
        assert budget is not None
        lapse = f" (the soonest in {_seconds(refusal.lapse_ms)})" if refusal.lapse_ms else ""
        return (
            f"budget: this tenant's {_NAMES[refusal.limit]} of {_dollars(budget)} is spent or "
            f"held: {refusal.holding} of its admitted requests hold "
            f"{_dollars(refusal.held_nanos)} of it (each the largest bill it can make: its "
            f"prompt and max_tokens at its model's prices) until they end, or, those of a "
            f"router stopped before it ended them, until their holds lapse{lapse}; "
            f"retry in {wait}"
        )
    if refusal.limit == DAY_BUDGET:
        assert policy.day_budget_nanos is not None
        return (
            f"budget: this tenant's daily budget of {_dollars(policy.day_budget_nanos)} is "
            f"spent; it renews at 00:00 UTC, in {wait}"
        )
    assert policy.month_budget_nanos is not None
    return (
        f"budget: this tenant's monthly budget of {_dollars(policy.month_budget_nanos)} is "
        f"spent; it renews on the 1st at 00:00 UTC, in {wait}"
    )


def _dollars(nanos: int) -> str:
    """Exact: cents when whole, else down to the nano-dollar ($0.00015)."""
    whole, part = divmod(nanos, NANOS_PER_DOLLAR)
    fraction = f"{part:09d}".rstrip("0").ljust(2, "0")
    return f"${whole:,}.{fraction}"


def _seconds(ms: int) -> str:
    """A wait as people read it: seconds under 2 min, minutes under 2 h, else hours."""
    if ms < 120_000:
        return f"{ms / 1000:.1f} s"
    if ms < 7_200_000:
        return f"{ms / 60_000:.1f} min"
    return f"{ms / 3_600_000:.1f} h"
