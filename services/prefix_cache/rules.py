"""Anthropic prompt-caching rules as pure accounting: no I/O, no clock, no state.

Source: https://docs.claude.com/en/docs/build-with-claude/prompt-caching
- A ``cache_control`` breakpoint caches the prefix tools → system → messages up to and including
  its block; at most 4 breakpoints a request; empty text blocks cannot be cached.
- A prefix shorter than the model's minimum cacheable length is processed without caching.
- At each breakpoint the system also checks for hits at earlier block boundaries: the lookback
  checks 20 block positions, the breakpoint itself included (a breakpoint on block 30 checks
  blocks 30 down to 11); the longest warm prefix is read. A run of consecutive ``tool_use``
  blocks counts as one position, and so does a run of consecutive ``tool_result`` blocks (each
  of the run's blocks is checked): a turn of many parallel tool calls does not push the
  previous request's entry out of the window on its own.
- 1-hour and 5-minute entries may be mixed, but 1-hour entries must come before 5-minute ones;
  billing goes by position: reads, then 1-hour writes, then 5-minute writes, then input.
- The prefix is cached once the response begins; each read refreshes the entry's lifetime.
  The lifetime is measured from the start of the request that writes or reads the entry, not
  from its response (the stores apply it: ``warm.py``).

The accounting is split in two steps so the warm-state store can do its part atomically in
between (a Redis Lua script later): ``plan_prompt`` says which digests to probe and which
entries to write; ``settle`` turns the store's answer (the longest warm hit) into the split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.common.models import ModelSpec
from services.common.prompt import TTL_1H, Block

MAX_BREAKPOINTS = 4
_RUN_KINDS = ("tool_use", "tool_result")  # a run of consecutive blocks of one is one position
TTL_MS = {"5m": 300_000, TTL_1H: 3_600_000}


class RuleViolation(ValueError):
    """The request breaks a caching rule the provider would reject (INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class Site:
    """Where a canonical block came from in the request, for error messages."""

    field: str  # e.g. "request.messages[2].content[0]"
    empty: bool  # the block's own content is empty


@dataclass(frozen=True)
class Probe:
    """A block boundary whose prefix may be warm."""

    digest: str
    tokens: int  # prompt tokens up to and including the block


@dataclass(frozen=True)
class Write:
    """A cache entry to create (or refresh) at a cacheable breakpoint."""

    digest: str
    tokens: int
    ttl_ms: int


@dataclass(frozen=True)
class PromptPlan:
    prompt_tokens: int
    probes: tuple[Probe, ...]  # every boundary a read may hit, deduplicated
    writes: tuple[Write, ...]  # one per cacheable breakpoint, in prompt order
    cached_end: int  # tokens up to the last cacheable breakpoint (0 if none)
    end_1h: int  # tokens up to the last cacheable 1-hour breakpoint (0 if none)
    # "anthropic" bills writes by position; "openai" and "self_hosted" bill reads only, and
    # cached_end is then the longest prefix a read may cover.
    kind: str = "anthropic"


@dataclass(frozen=True)
class Split:
    """The prompt split as billed: prompt = input + write_5m + write_1h + read."""

    input_tokens: int
    write_5m_tokens: int
    write_1h_tokens: int
    read_tokens: int

    @property
    def creation_tokens(self) -> int:
        return self.write_5m_tokens + self.write_1h_tokens

    @property
    def prompt_tokens(self) -> int:
        return self.input_tokens + self.creation_tokens + self.read_tokens


def check_breakpoints(blocks: Sequence[Block], sites: Sequence[Site]) -> None:
    """Raises RuleViolation, naming the field, for a request the provider would reject."""
    if len(sites) != len(blocks):
        raise ValueError(f"{len(sites)} sites for {len(blocks)} blocks")
    marked = [i for i, block in enumerate(blocks) if block.breakpoint is not None]
    if len(marked) > MAX_BREAKPOINTS:
        fields = ", ".join(sites[i].field for i in marked)
        raise RuleViolation(
            f"request: {len(marked)} blocks carry cache_control ({fields}); at most "
            f"{MAX_BREAKPOINTS} breakpoints are allowed, remove {len(marked) - MAX_BREAKPOINTS}"
        )
    seen_5m: str | None = None
    for i in marked:
        if sites[i].empty:
            raise RuleViolation(
                f"{sites[i].field}.cache_control: an empty block cannot be cached; move the "
                "breakpoint to a block with content"
            )
        if blocks[i].breakpoint == TTL_1H and seen_5m is not None:
            raise RuleViolation(
                f"{sites[i].field}.cache_control: a 1-hour breakpoint follows the 5-minute "
                f"one at {seen_5m}; 1-hour entries must come before 5-minute entries"
            )
        if blocks[i].breakpoint != TTL_1H and seen_5m is None:
            seen_5m = sites[i].field


def lookback_positions(blocks: Sequence[Block]) -> list[int]:
    """Each block's lookback position (0-based): every block is a position of its own, except
    that a run of consecutive tool_use blocks shares one, and so does a run of tool_result."""
    positions: list[int] = []
    position = -1
    for i, block in enumerate(blocks):
        if i == 0 or block.kind not in _RUN_KINDS or blocks[i - 1].kind != block.kind:
            position += 1
        positions.append(position)
    return positions


def plan_prompt(
    blocks: Sequence[Block], sites: Sequence[Site], spec: ModelSpec, lookback: int
) -> PromptPlan:
    """The probes and writes of a prompt under ``spec``'s caching rules. ``lookback``: the
    block positions (``lookback_positions``) checked at each breakpoint, the breakpoint's
    included (>= 1)."""
    if lookback < 1:
        raise ValueError(f"lookback must be >= 1 (the breakpoint itself), got {lookback}")
    check_breakpoints(blocks, sites)
    positions = lookback_positions(blocks)
    ends: list[int] = []
    total = 0
    for block in blocks:
        total += block.tokens
        ends.append(total)
    probes: dict[str, Probe] = {}
    writes: list[Write] = []
    cached_end = end_1h = 0
    for i, block in enumerate(blocks):
        if block.breakpoint is None or ends[i] < spec.min_cacheable_tokens:
            continue  # not a breakpoint, or a prefix too short to cache
        ttl_ms = TTL_MS[block.breakpoint]
        writes.append(Write(block.digest, ends[i], ttl_ms))
        cached_end = ends[i]
        if block.breakpoint == TTL_1H:
            end_1h = ends[i]
        j = i  # the breakpoint, then earlier blocks while their position is in the window
        while j >= 0 and positions[i] - positions[j] < lookback:
            if ends[j] >= spec.min_cacheable_tokens:
                probes.setdefault(blocks[j].digest, Probe(blocks[j].digest, ends[j]))
            j -= 1
    ordered = tuple(sorted(probes.values(), key=lambda p: p.tokens))
    return PromptPlan(total, ordered, tuple(writes), cached_end, end_1h)


def settle(plan: PromptPlan, read_tokens: int) -> Split:
    """The split once the store has found the longest warm prefix (0 = none)."""
    read = min(max(read_tokens, 0), plan.cached_end)
    if plan.kind != "anthropic":  # no write premium: the rest is plain input
        return Split(plan.prompt_tokens - read, 0, 0, read)
    write_1h = max(plan.end_1h - read, 0)
    write_5m = plan.cached_end - read - write_1h
    return Split(
        input_tokens=plan.prompt_tokens - plan.cached_end,
        write_5m_tokens=write_5m,
        write_1h_tokens=write_1h,
        read_tokens=read,
    )
