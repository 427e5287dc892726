"""A real provider's reported usage, checked and mapped onto cachemesh's split.

Anthropic's ``usage`` already has cachemesh's meaning: ``input_tokens`` excludes the cache
tokens, ``cache_creation_input_tokens`` is split by TTL in ``cache_creation.ephemeral_5m/1h``
(https://docs.claude.com/en/docs/build-with-claude/prompt-caching#tracking-cache-performance).
OpenAI's ``prompt_tokens`` *includes* ``prompt_tokens_details.cached_tokens``
(https://platform.openai.com/docs/guides/prompt-caching), so input = prompt - cached: each
token is counted once. A report that is negative, inconsistent or of the other provider's
shape is ``BadUsage`` (INVALID_ARGUMENT) and nothing is recorded. A self-hosted engine speaks
the OpenAI-compatible API, so its report has OpenAI's shape (``cached_tokens`` = its KV reuse).
"""

from __future__ import annotations

from dataclasses import dataclass

from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.models import ModelSpec
from services.prefix_cache.rules import Split

FIELD = "provider_usage"
# The shape of usage each rule set's provider reports.
_SHAPE = {"anthropic": "anthropic", "openai": "openai", "self_hosted": "openai"}


class BadUsage(ValueError):
    """INVALID_ARGUMENT: the reported usage is impossible; the message names the field."""


@dataclass(frozen=True)
class Reported:
    split: Split
    output_tokens: int


def _non_negative(values: dict[str, int]) -> None:
    for name, value in values.items():
        if value < 0:
            raise BadUsage(f"{FIELD}.{name} must be >= 0, got {value}")


def reported_usage(usage: pc.ProviderUsage, spec: ModelSpec) -> Reported:
    kind = usage.WhichOneof("report")
    if kind is None:
        raise BadUsage(f"{FIELD}: set anthropic or openai (the provider's usage object)")
    if _SHAPE[spec.rules] != kind:
        raise BadUsage(
            f"{FIELD}.{kind}: {spec.id} is billed under {spec.rules!r} rules; send the usage "
            f"in the {_SHAPE[spec.rules]} shape"
        )
    if kind == "anthropic":
        return _anthropic(usage.anthropic)
    return _openai(usage.openai)


def _anthropic(u: pc.AnthropicUsage) -> Reported:
    where = "anthropic"
    _non_negative(
        {
            f"{where}.input_tokens": u.input_tokens,
            f"{where}.cache_creation_input_tokens": u.cache_creation_input_tokens,
            f"{where}.cache_read_input_tokens": u.cache_read_input_tokens,
            f"{where}.output_tokens": u.output_tokens,
            f"{where}.cache_creation.ephemeral_5m_input_tokens": (
                u.cache_creation.ephemeral_5m_input_tokens
            ),
            f"{where}.cache_creation.ephemeral_1h_input_tokens": (
                u.cache_creation.ephemeral_1h_input_tokens
            ),
        }
    )
    creation = u.cache_creation_input_tokens
    if u.HasField("cache_creation"):
        w5 = u.cache_creation.ephemeral_5m_input_tokens
        w1 = u.cache_creation.ephemeral_1h_input_tokens
        if w5 + w1 != creation:
            raise BadUsage(
                f"{FIELD}.{where}.cache_creation: ephemeral_5m ({w5}) + ephemeral_1h ({w1}) must "
                f"equal cache_creation_input_tokens ({creation})"
            )
    else:
        w5, w1 = creation, 0  # no breakdown (older responses): the default TTL is 5 minutes
    split = Split(u.input_tokens, w5, w1, u.cache_read_input_tokens)
    if split.prompt_tokens == 0:
        raise BadUsage(f"{FIELD}.{where}: a prompt of 0 tokens is impossible")
    return Reported(split, u.output_tokens)


def _openai(u: pc.OpenAIUsage) -> Reported:
    where = "openai"
    cached = u.prompt_tokens_details.cached_tokens
    _non_negative(
        {
            f"{where}.prompt_tokens": u.prompt_tokens,
            f"{where}.completion_tokens": u.completion_tokens,
            f"{where}.total_tokens": u.total_tokens,
            f"{where}.prompt_tokens_details.cached_tokens": cached,
        }
    )
    if u.prompt_tokens == 0:
        raise BadUsage(f"{FIELD}.{where}.prompt_tokens: a prompt of 0 tokens is impossible")
    if cached > u.prompt_tokens:
        raise BadUsage(
            f"{FIELD}.{where}.prompt_tokens_details.cached_tokens ({cached}) exceeds "
            f"prompt_tokens ({u.prompt_tokens}), which include them"
        )
    if u.total_tokens and u.total_tokens != u.prompt_tokens + u.completion_tokens:
        raise BadUsage(
            f"{FIELD}.{where}.total_tokens ({u.total_tokens}) must equal prompt_tokens + "
            f"completion_tokens ({u.prompt_tokens + u.completion_tokens})"
        )
    return Reported(Split(u.prompt_tokens - cached, 0, 0, cached), u.completion_tokens)
