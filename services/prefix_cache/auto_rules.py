"""The rule sets without breakpoints: OpenAI's automatic prompt caching and a self-hosted
engine's KV prefix cache. Pure accounting, like ``rules.py``.

OpenAI (https://platform.openai.com/docs/guides/prompt-caching):
- caching is automatic for prompts of 1024 tokens or more (``min_cacheable_tokens``);
- a hit is the longest previously seen exact prefix, counted in increments of 128 tokens
  (``cache_increment_tokens``): 1024, 1152, 1280, ... (a 2006-token prompt reads at most 1920);
- cached input is billed at the model's discounted price; there is no write premium;
- an unused prefix is kept ``cache_lifetime_s``: ``idle_retention_s`` under in-memory retention
  (documented: "typically ... within 5 to 10 minutes of inactivity", modelled as the row's
  300 s), 24 hours under extended retention (a row's ``prompt_cache_retention = "24h"``, which
  the OpenAI adapter sends); each use refreshes it;
- ``prompt_cache_key`` takes part in the routing to a cache: requests with different keys do
  not share a cache (the key is part of the scope, see ``scope_for``).

Self-hosted (vLLM automatic prefix caching): the replica's KV cache decides; prefix-cache only
predicts it (``replica_view.py``). The read is the replica's match in full blocks of 16, never
the prompt's last token (it is always computed).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

from cachemesh.v1 import gateway_pb2 as pb
from services.common.kv_blocks import reusable_blocks
from services.common.models import ModelSpec
from services.common.prompt import Block, prompt_token_ids
from services.prefix_cache.rules import (
    Probe,
    PromptPlan,
    Site,
    Write,
    check_breakpoints,
    plan_prompt,
)

_OPENAI_ROOT = b"cachemesh.openai.v1"


def openai_boundaries(prompt_tokens: int, spec: ModelSpec) -> list[int]:
    """The prefix lengths a hit may have: min, min + step, ... up to the prompt's length."""
    if prompt_tokens < spec.min_cacheable_tokens:
        return []
    return list(range(spec.min_cacheable_tokens, prompt_tokens + 1, spec.cache_increment_tokens))


def plan_openai(token_ids: Sequence[int], spec: ModelSpec) -> PromptPlan:
    bounds = openai_boundaries(len(token_ids), spec)
    ttl_ms = spec.cache_lifetime_s * 1000
    probes: list[Probe] = []
    digest = hashlib.sha256(_OPENAI_ROOT).digest()
    start = 0
    for end in bounds:
        chunk = token_ids[start:end]
        digest = hashlib.sha256(digest + struct.pack(f"<{len(chunk)}I", *chunk)).digest()
        probes.append(Probe(digest.hex(), end))
        start = end
    writes = tuple(Write(p.digest, p.tokens, ttl_ms) for p in probes)
    cached_end = bounds[-1] if bounds else 0
    return PromptPlan(len(token_ids), tuple(probes), writes, cached_end, 0, kind="openai")


def plan_self_hosted(prompt_tokens: int, spec: ModelSpec) -> PromptPlan:
    cached_end = reusable_blocks(prompt_tokens) * spec.kv_block_tokens
    return PromptPlan(prompt_tokens, (), (), cached_end, 0, kind="self_hosted")


def plan_for(
    blocks: Sequence[Block], sites: Sequence[Site], spec: ModelSpec, lookback: int
) -> PromptPlan:
    """The plan under ``spec``'s rule set. Breakpoints are checked for every rule set: the
    Gateway's request shape is Anthropic's, and a malformed one is rejected whatever the model."""
    if spec.rules == "anthropic":
        return plan_prompt(blocks, sites, spec, lookback)
    check_breakpoints(blocks, sites)
    ids = prompt_token_ids(list(blocks))
    if spec.rules == "openai":
        return plan_openai(ids, spec)
    return plan_self_hosted(len(ids), spec)


def scope_for(spec: ModelSpec, tenant: str, request: pb.CompleteRequest) -> tuple[str, ...]:
    """Caches are isolated per tenant and model; OpenAI's also per ``prompt_cache_key``."""
    if spec.rules == "openai":
        return (tenant, spec.id, f"key={request.cache.prompt_cache_key}")
    return (tenant, spec.id)
