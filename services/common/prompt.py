"""The canonical prompt: tools → system → messages, as a list of blocks with token counts.

This is the one serialization that prefix-cache bills and the model engine prefills, so the
two always agree on what a prefix is. Each block's ``digest`` chains the digests before it
(and ignores ``cache_control``: moving a breakpoint does not change the content), so two
prompts share a prefix up to block *i* exactly when their digests at *i* are equal.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal, NamedTuple

from cachemesh.v1 import gateway_pb2 as pb
from services.common import tool_choice
from services.common.tokens import Tokenizer

Section = Literal["tools", "system", "messages"]
# What a block is: a tool definition, text, a tool call or a tool result. Anthropic's lookback
# counts a run of consecutive tool_use (or tool_result) blocks as one position.
BlockKind = Literal["tool", "text", "tool_use", "tool_result"]
TTL_5M = "5m"
TTL_1H = "1h"

_ROLE = {pb.ROLE_USER: "user", pb.ROLE_ASSISTANT: "assistant"}


@dataclass(frozen=True)
class Block:
    section: Section
    index: int  # position in the canonical order
    text: str  # the canonical serialization that is tokenized
    token_ids: tuple[int, ...]
    breakpoint: str | None  # "5m" | "1h" when the block carries cache_control
    digest: str  # hex sha256 chained over every block up to and including this one
    kind: BlockKind = "text"

    @property
    def tokens(self) -> int:
        return len(self.token_ids)


def breakpoint_ttl(has_control: bool, ttl: int) -> str | None:
    if not has_control:
        return None
    return TTL_1H if ttl == pb.CACHE_TTL_1H else TTL_5M


def block_text(block: pb.ContentBlock) -> str:
    kind = block.WhichOneof("kind")
    if kind == "text":
        return block.text
    if kind == "tool_use":
        use = block.tool_use
        return f"<tool_use id={use.id} name={use.name}>{use.input_json}</tool_use>"
    if kind == "tool_result":
        result = block.tool_result
        error = " error" if result.is_error else ""
        return f"<tool_result id={result.tool_use_id}{error}>{result.content}</tool_result>"
    return ""


class _Part(NamedTuple):
    section: Section
    text: str
    ttl: str | None
    kind: BlockKind


def _kind(block: pb.ContentBlock) -> BlockKind:
    kind = block.WhichOneof("kind")
    if kind == "tool_use" or kind == "tool_result":
        return kind
    return "text"


def _parts(request: pb.CompleteRequest) -> list[_Part]:
    parts: list[_Part] = []
    for tool in request.tools:
        text = f"<tool name={tool.name}>\n{tool.description}\n{tool.input_schema_json}\n</tool>\n"
        ttl = breakpoint_ttl(tool.HasField("cache_control"), tool.cache_control.ttl)
        parts.append(_Part("tools", text, ttl, "tool"))
    for block in request.system:
        ttl = breakpoint_ttl(block.HasField("cache_control"), block.cache_control.ttl)
        parts.append(_Part("system", block_text(block) + "\n", ttl, _kind(block)))
    for message in request.messages:
        role = _ROLE.get(message.role, "unknown")
        for i, block in enumerate(message.content):
            header = f"\n\n{role}: " if i == 0 else "\n"
            ttl = breakpoint_ttl(block.HasField("cache_control"), block.cache_control.ttl)
            parts.append(_Part("messages", header + block_text(block), ttl, _kind(block)))
    return parts


def canonical_blocks(request: pb.CompleteRequest, tokenizer: Tokenizer) -> list[Block]:
    """The request's blocks. A tool choice but auto enters the chain where the messages begin:
    Anthropic's prompt cache keeps the tools' and the system's entries across a change of
    ``tool_choice`` and loses the messages' ("what invalidates the cache": tool choice changes
    invalidate message blocks), so a prefix of messages written under one choice is no hit
    under another, and a prefix of tools and system is. Auto (and no choice) leaves every
    digest as it was before the field."""
    blocks: list[Block] = []
    chain = hashlib.sha256(b"cachemesh.prompt.v1").hexdigest()
    choice = tool_choice.canonical(request)
    for index, (section, text, ttl, kind) in enumerate(_parts(request)):
        if choice and section == "messages":
            chain = hashlib.sha256(f"{chain}\x00tool_choice\x00{choice}".encode()).hexdigest()
            choice = ""  # once, before the first message block
        chain = hashlib.sha256(f"{chain}\x00{section}\x00{text}".encode()).hexdigest()
        blocks.append(
            Block(
                section=section,
                index=index,
                text=text,
                token_ids=tokenizer.encode(text),
                breakpoint=ttl,
                digest=chain,
                kind=kind,
            )
        )
    return blocks


def prompt_tokens(request: pb.CompleteRequest, tokenizer: Tokenizer) -> int:
    """The canonical prompt's token count, without building its blocks or their digests.

    Equal to ``sum(b.tokens for b in canonical_blocks(request, tokenizer))``: what an L1 hit
    needs for its baseline price, so a hit costs no PrefixCache.Plan call.
    """
    return sum(tokenizer.count(part.text) for part in _parts(request))


def cacheable_tokens(request: pb.CompleteRequest, tokenizer: Tokenizer) -> int:
    """The canonical prompt's tokens up to its last cache breakpoint (0 without one): the most
    a provider could read from its cache, since a read ends at a breakpoint. Only the prompt
    after them (``prompt_tokens`` less this) is surely counted as new input."""
    parts = _parts(request)
    last = max((i for i, part in enumerate(parts) if part.ttl is not None), default=-1)
    return sum(tokenizer.count(part.text) for part in parts[: last + 1])


def prompt_chars(request: pb.CompleteRequest) -> int:
    """The characters of the canonical prompt: what ``prompt_tokens`` would tokenize, read
    without tokenizing (a cost in proportion to it, without the tokenizer's)."""
    return sum(len(part.text) for part in _parts(request))


def prompt_digest(blocks: list[Block]) -> str:
    """The whole canonical prompt's chained digest (its last block's; "" for no blocks)."""
    return blocks[-1].digest if blocks else ""


def prompt_token_ids(blocks: list[Block]) -> list[int]:
    ids: list[int] = []
    for block in blocks:
        ids.extend(block.token_ids)
    return ids


def last_user_text(request: pb.CompleteRequest) -> str | None:
    """The text of the last message when it is the user's, else None (a prefill)."""
    if not request.messages or request.messages[-1].role != pb.ROLE_USER:
        return None
    texts = [b.text for b in request.messages[-1].content if b.WhichOneof("kind") == "text"]
    return "\n".join(texts) if texts else None
