"""The model table (``models.toml``): ids, tiers, prices in nano-dollars, caching rules: its
rows, their checks, and the file read. ``services.common.model_overrides`` applies the
operator's changes to it (the ``CACHEMESH_*`` variables)."""

from __future__ import annotations

import itertools
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from services.common.env import MAX_TOKENS, MAX_TOKENS_PER_S, ConfigError

AUTO = "auto"
# A tier's name. Every table has the two ends, "small" (the cheapest) and "large" (the
# dearest); a table may name more between them (e.g. "medium"), ordered by their price.
Tier = str
SMALLEST: Tier = "small"
LARGEST: Tier = "large"
_TIER_NAME = r"^[a-z][a-z0-9_-]{0,31}$"


Provider = Literal["simulated", "anthropic", "openai", "self_hosted"]
Rules = Literal["anthropic", "openai", "self_hosted"]
# Fields each rule set needs in its row, and fields it must not have (a price it never bills).
_RULE_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "anthropic": (
        (
            "cache_write_5m_nanos",
            "cache_write_1h_nanos",
            "cache_read_nanos",
            "min_cacheable_tokens",
        ),
        ("cache_increment_tokens", "idle_retention_s", "kv_block_tokens"),
    ),
    "openai": (
        ("cache_read_nanos", "min_cacheable_tokens", "cache_increment_tokens", "idle_retention_s"),
        ("cache_write_5m_nanos", "cache_write_1h_nanos", "kv_block_tokens"),
    ),
    "self_hosted": (
        ("cache_read_nanos", "kv_block_tokens"),
        ("cache_write_5m_nanos", "cache_write_1h_nanos", "cache_increment_tokens"),
    ),
}
KV_BLOCK_TOKENS = 16  # the simulated engine's and vLLM's default block size
# OpenAI's extended prompt cache retention ("24h"): "up to a maximum of 24 hours"
EXTENDED_RETENTION_S = 86_400
# The cache prices a row may have, each needing its long-context rate when the row has one.
_CACHE_RATES = ("cache_write_5m_nanos", "cache_write_1h_nanos", "cache_read_nanos")
# The dearest price a token may have: 10M nano-dollars ($10,000 a million tokens; the dearest
# shipped row is $75). With a request's tokens at most MAX_TOKENS of prompt and as many of
# output, its bill is under 2 * 10**15 nano-dollars, below 2**53: exact where the limits'
# Redis adds it (a Lua double; past 10**17 its INCRBY failed "not an integer", nothing was
# counted) and far inside the int64 fields that carry it. 10**23 was taken before.
MAX_PRICE_NANOS = 10_000_000


@dataclass(frozen=True)
class Rates:
    """The prices, in nanos a token, a request is billed at (a row's own, or its long-context
    ones when the prompt is over the row's ``long_context.above_tokens``)."""

    input_nanos: int
    output_nanos: int
    cache_write_5m_nanos: int
    cache_write_1h_nanos: int
    cache_read_nanos: int


class LongContext(BaseModel):
    """A row's long-context tier: a request whose prompt (input, cache writes and cache reads
    together) is over ``above_tokens`` tokens is billed at these rates, the WHOLE request (its
    output too), as OpenAI bills GPT-5.4 over 272K input tokens. Every cache price the row has
    needs its rate here; a price the row lacks must be absent."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    above_tokens: int = Field(gt=0, le=MAX_TOKENS)
    input_nanos: int = Field(ge=0, le=MAX_PRICE_NANOS)
    output_nanos: int = Field(ge=0, le=MAX_PRICE_NANOS)
    cache_write_5m_nanos: int | None = Field(default=None, ge=0, le=MAX_PRICE_NANOS)
    cache_write_1h_nanos: int | None = Field(default=None, ge=0, le=MAX_PRICE_NANOS)
    cache_read_nanos: int | None = Field(default=None, ge=0, le=MAX_PRICE_NANOS)


# The providers whose API continues a last assistant message (a row may say otherwise:
# ``ModelSpec.takes_prefill``)
_CONTINUES_PREFILL = frozenset({"anthropic", "simulated"})
# The providers whose models that think by default take no temperature but 1
# (``ModelSpec.default_temperature_only``); a self-hosted engine's samples as asked
_DEFAULT_TEMPERATURE_ONLY_PROVIDERS = frozenset({"openai", "anthropic"})


class ModelSpec(BaseModel):
    """One row of the table. ``rules`` picks the caching rule set; each rule set requires its
    own fields (and forbids the prices it never bills), checked when the table loads."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    tier: Tier = Field(pattern=_TIER_NAME)
    provider: Provider
    rules: Rules
    priced_like: str = ""
    source: str = Field(min_length=1)
    # The provider's own model id (what an adapter sends as `model`); "" = this row's id. An
    # OpenAI-compatible engine's replica may rename it (MODEL_UPSTREAM_IDS).
    upstream_id: str = ""
    # OpenAI Chat Completions: the output limit's parameter. OpenAI's current models take
    # max_completion_tokens (reasoning models refuse max_tokens); most compatible engines
    # take max_tokens.
    max_tokens_param: Literal["max_tokens", "max_completion_tokens"] = "max_tokens"
    # The vocabulary this row's prompts and answers are counted with (services.common.tokens):
    # o200k_base for OpenAI's gpt-4o, gpt-4.1, gpt-5 and later; cl100k_base for the rest
    # (Claude's tokenizer is not public: an estimate until the provider's usage reconciles it)
    tokenizer: Literal["cl100k_base", "o200k_base"] = "cl100k_base"
    # The model thinks before it answers (billed as output) when a request says nothing of
    # thinking, as its provider documents (cited in `source`). The Gateway has no thinking
    # setting and no adapter sends one, so cachemesh cannot turn it off: the HTTP front
    # refuses an Anthropic `thinking: {"type": "disabled"}` to such a model, never drops it.
    thinks_by_default: bool = False
    # The model's chain of thought is billed as output outside ``max_tokens`` (DeepSeek's
    # deepseek-reasoner, R1, and SiliconFlow's reasoning endpoints bound only the final answer
    # by it): a request's bill can reach the row's ``max_output_tokens`` whatever its
    # ``max_tokens``, and a tenant's budget holds that much while it runs (the router's README,
    # "Budgets"). Claude's and OpenAI's thinking is within max_tokens: false for them.
    thinks_outside_max_tokens: bool = False
    # The model continues a last assistant message (a prefill: its answer goes on from that
    # text, the Messages API's meaning, which the Gateway's follows); a request with one to a
    # row that does not is refused (the router's validation). None: its provider's way
    # (``continues_prefill``): Anthropic's and the simulator's continue it; OpenAI's Chat
    # Completions has no prefill (its model answers a new message after it), nor has a
    # self-hosted OpenAI-compatible engine by default (vLLM answers anew without its
    # continue_final_message, which the adapter does not send); llama-server continues it
    # (its rows say ``takes_prefill = true``).
    takes_prefill: bool | None = None
    # The engine repeats a prefill it continues at the start of its answer (llama-server: [user,
    # assistant "The capital of France is"] -> "The capital of France is Paris.", its
    # completion_tokens the continuation's alone): the replica's OpenAI-compatible adapter
    # strips that echo, only when the answer starts with the prefill's text, so a caller
    # joining prefill and answer does not get the prefill twice. A self-hosted row that
    # continues a prefill only.
    echoes_prefill: bool = False
    # The model is given the request's tools and tool calls: every provider's API takes them,
    # but an engine whose model's chat template has no tool support drops them without a word
    # (llama-server with SmolLM2-135M-Instruct: its /props says ``supports_tools: false``, a
    # prompt with a tool is as many tokens as the same without, and an assistant's tool call
    # is rendered as an empty turn). A request with tools or tool blocks to a row that says
    # ``takes_tools = false`` (or to ``auto`` when it may pick one) is refused (the router's
    # validation): before, it was answered as if it had none.
    takes_tools: bool = True
    # The engine honours a named tool choice (the Gateway's ``tool_choice`` MODE_TOOL). Every
    # hosted API and the simulator do; llama-server reads ``tool_choice`` as a string only
    # ("auto", "none", "required": common_chat_tool_choice_parse_oaicompat) and takes an object,
    # the named form, as its default, auto, without a word. A request naming a tool to a row
    # that says ``takes_named_tool_choice = false`` (or to ``auto`` when it may pick one) is
    # refused (the router's validation); a self-hosted row only.
    takes_named_tool_choice: bool = True
    input_nanos: int = Field(ge=0, le=MAX_PRICE_NANOS)
    output_nanos: int = Field(ge=0, le=MAX_PRICE_NANOS)
    cache_write_5m_nanos: int = Field(default=0, ge=0, le=MAX_PRICE_NANOS)
    cache_write_1h_nanos: int = Field(default=0, ge=0, le=MAX_PRICE_NANOS)
    cache_read_nanos: int = Field(default=0, ge=0, le=MAX_PRICE_NANOS)
    # anthropic / openai: the shortest prefix the provider caches. self_hosted (optional): the
    # shortest KV reuse reported as served by the prefix cache (default: one KV block)
    min_cacheable_tokens: int = Field(default=0, ge=0)
    cache_increment_tokens: int = Field(default=0, ge=0)  # openai: hits in these increments
    idle_retention_s: int = Field(default=0, ge=0)  # openai: an unused prefix lives this long
    # openai: the retention policy sent as `prompt_cache_retention` (None: the field is not
    # sent, for models without the choice). "in_memory" keeps idle_retention_s; "24h" (extended
    # retention) keeps an unused prefix EXTENDED_RETENTION_S. A model that has the choice may
    # default to "24h" (OpenAI: for organisations without Zero Data Retention), so its row names
    # its policy: the provider then keeps the prefix as long as prefix-cache predicts.
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    kv_block_tokens: int = Field(default=0, ge=0)  # self_hosted: full blocks only
    # the rates of a prompt over a length (OpenAI's GPT-5.4 over 272K input tokens); None: one
    # price at any length
    long_context: LongContext | None = None
    context_window_tokens: int = Field(gt=0, le=MAX_TOKENS)
    max_output_tokens: int = Field(gt=0, le=MAX_TOKENS)
    # simulated engines only; each rate at most MAX_TOKENS_PER_S (a TOML ``inf`` was taken)
    prefill_tokens_per_s: float | None = Field(default=None, gt=0, le=MAX_TOKENS_PER_S)
    decode_tokens_per_s: float | None = Field(default=None, gt=0, le=MAX_TOKENS_PER_S)
    # The prefill rate the router's TTFT replica policy assumes for a replica of this model
    # until it has measured that replica (a non-simulated row: a self-hosted engine is often
    # far slower than the hosted providers ROUTER_TTFT_PRIOR_PREFILL_TPS is meant for). Unset:
    # that global. A simulated row's prior is its prefill_tokens_per_s.
    prior_prefill_tokens_per_s: float | None = Field(default=None, gt=0, le=MAX_TOKENS_PER_S)
    # self_hosted: the requests a replica's engine serves at once (llama-server's --parallel
    # slots), so the router counts a call decoding there as occupying a slot: a request sent
    # to a full replica waits for a decode to end. Unset: the engine batches (vLLM, SGLang),
    # a request's prefill runs beside the others' decodes; the simulator batches.
    replica_slots: int | None = Field(default=None, gt=0)
    # speculative decoding (simulated engines only): a draft model proposes draft_tokens (k)
    # tokens a step, each kept with probability draft_acceptance_rate (alpha); latency only
    draft_model: str | None = None
    draft_tokens: int = Field(default=0, ge=0)
    draft_acceptance_rate: float | None = Field(default=None, ge=0.0, le=1.0)

    @property
    def continues_prefill(self) -> bool:
        """Whether a last assistant message is continued (``takes_prefill``, else by provider)."""
        if self.takes_prefill is not None:
            return self.takes_prefill
        return self.provider in _CONTINUES_PREFILL

    @model_validator(mode="after")
    def _fields_of_the_rule_set(self) -> ModelSpec:
        required, forbidden = _RULE_FIELDS[self.rules]
        given = self.model_fields_set
        missing = [name for name in required if name not in given]
        if missing:
            raise ValueError(f"models.{self.id}: rules {self.rules!r} need {', '.join(missing)}")
        extra = [name for name in forbidden if name in given]
        if extra:
            raise ValueError(
                f"models.{self.id}: rules {self.rules!r} do not use {', '.join(extra)}"
            )
        if self.prompt_cache_retention is not None and self.rules != "openai":
            raise ValueError(
                f"models.{self.id}: prompt_cache_retention is OpenAI's; rules "
                f"{self.rules!r} do not use it, remove it"
            )
        reasoning = self.provider == "openai" and self.thinks_by_default
        if reasoning and self.max_tokens_param != "max_completion_tokens":
            raise ValueError(
                f"models.{self.id}: an OpenAI model that thinks by default (a reasoning model) "
                "takes its output limit as max_completion_tokens (OpenAI refuses max_tokens "
                'for it): set max_tokens_param = "max_completion_tokens"'
            )
        if self.rules == "openai" and self.cache_increment_tokens <= 0:
            raise ValueError(f"models.{self.id}: cache_increment_tokens must be > 0")
        if self.rules == "self_hosted" and self.kv_block_tokens != KV_BLOCK_TOKENS:
            raise ValueError(f"models.{self.id}: kv_block_tokens must be {KV_BLOCK_TOKENS}")
        if self.provider == "simulated" and (
            self.prefill_tokens_per_s is None or self.decode_tokens_per_s is None
        ):
            raise ValueError(
                f"models.{self.id}: a simulated model needs prefill_tokens_per_s and "
                "decode_tokens_per_s"
            )
        if self.replica_slots is not None and self.provider != "self_hosted":
            raise ValueError(
                f"models.{self.id}: replica_slots is a self-hosted engine's; remove it"
            )
        if self.provider == "simulated" and self.prior_prefill_tokens_per_s is not None:
            raise ValueError(
                f"models.{self.id}: a simulated model's prior prefill rate is its "
                "prefill_tokens_per_s; remove prior_prefill_tokens_per_s"
            )
        if not self.takes_named_tool_choice and self.provider != "self_hosted":
            raise ValueError(
                f"models.{self.id}: takes_named_tool_choice = false is for a self-hosted "
                f"engine's row ({self.provider}'s API takes a named tool choice); remove it"
            )
        if self.echoes_prefill and not (self.provider == "self_hosted" and self.continues_prefill):
            raise ValueError(
                f"models.{self.id}: echoes_prefill is for a self-hosted row that continues a "
                "prefill (takes_prefill = true); remove it"
            )
        self._check_drafting()
        self._check_long_context()
        return self

    def _check_long_context(self) -> None:
        long = self.long_context
        if long is None:
            return
        given = long.model_fields_set
        missing = [n for n in _CACHE_RATES if n in self.model_fields_set and n not in given]
        if missing:
            raise ValueError(
                f"models.{self.id}: long_context needs {', '.join(missing)} (the row has "
                "that price; give its long-context rate)"
            )
        extra = [n for n in _CACHE_RATES if n in given and n not in self.model_fields_set]
        if extra:
            raise ValueError(
                f"models.{self.id}: long_context.{', long_context.'.join(extra)}: the row has "
                "no such price; remove it"
            )
        if long.above_tokens >= self.context_window_tokens:
            raise ValueError(
                f"models.{self.id}: long_context.above_tokens ({long.above_tokens}) must be "
                f"below context_window_tokens ({self.context_window_tokens}), or no prompt "
                "reaches it"
            )

    def _check_drafting(self) -> None:
        given = [self.draft_model is not None, self.draft_tokens > 0]
        given.append(self.draft_acceptance_rate is not None)
        if any(given) and not all(given):
            raise ValueError(
                f"models.{self.id}: speculative decoding needs draft_model, draft_tokens (> 0) "
                "and draft_acceptance_rate together"
            )
        if any(given) and self.provider != "simulated":
            raise ValueError(f"models.{self.id}: only a simulated model decodes with a draft")

    @property
    def upstream(self) -> str:
        return self.upstream_id or self.id

    @property
    def default_temperature_only(self) -> bool:
        """The provider takes no temperature but its default, 1, for this row: a hosted row
        that thinks by default (``thinks_by_default``). OpenAI's reasoning models (gpt-5,
        gpt-5-mini, gpt-5-nano, the o-series) refuse any other value with a 400
        (``unsupported_value``: "Only the default (1) value is supported"), and the Gateway
        has no reasoning setting that would make them take one (gpt-5.1 and later take it
        under reasoning effort "none", their default: such a row does not think by default).
        Anthropic's Claude Sonnet 5 and Opus 5 refuse a sampling parameter at a value but its
        default under every API version (a 400, "`temperature` is deprecated for this
        model."; the replica sends a temperature under 2023-06-01, which takes 1). A
        self-hosted engine's reasoning model samples as asked. (Anthropic's Opus 4.7 and 4.8
        refuse it too without thinking by default: a row for one needs more than this.)"""
        return self.provider in _DEFAULT_TEMPERATURE_ONLY_PROVIDERS and self.thinks_by_default

    @property
    def cache_lifetime_s(self) -> int:
        """openai: how long an unused prefix is kept, under the row's retention policy."""
        if self.prompt_cache_retention == "24h":
            return EXTENDED_RETENTION_S
        return self.idle_retention_s

    @property
    def min_prefix_hit_tokens(self) -> int:
        """The smallest cache read that makes a model call served by the prefix cache
        (``LAYER_PREFIX_CACHE``): the provider's minimum cacheable prefix; for a self-hosted
        engine at least one full KV block (an engine that reused only the chat template's
        opening tokens served nothing of the prompt from its cache), or the row's own
        ``min_cacheable_tokens`` when larger."""
        if self.rules == "self_hosted":
            return max(self.kv_block_tokens, self.min_cacheable_tokens, 1)
        return max(self.min_cacheable_tokens, 1)

    @property
    def prior_prefill_rate(self) -> float | None:
        """The rate a replica is assumed to prefill at until measured (None: the router's
        global prior)."""
        if self.prior_prefill_tokens_per_s is not None:
            return self.prior_prefill_tokens_per_s
        return self.prefill_tokens_per_s

    @property
    def prefill_rate(self) -> float:
        if self.prefill_tokens_per_s is None:
            raise ValueError(f"{self.id} is not simulated: it has no prefill speed")
        return self.prefill_tokens_per_s

    @property
    def decode_rate(self) -> float:
        if self.decode_tokens_per_s is None:
            raise ValueError(f"{self.id} is not simulated: it has no decode speed")
        return self.decode_tokens_per_s

    def most_output_tokens(self, max_tokens: int) -> int:
        """The most output a request of ``max_tokens`` to this row can write, and be billed
        for: ``max_tokens``, or the row's ``max_output_tokens`` when the row bills its thinking
        outside ``max_tokens`` (``thinks_outside_max_tokens``: R1's 405 output tokens at
        max_tokens 16). What a tenant's budget holds and its token rate reserves of it."""
        if self.thinks_outside_max_tokens:
            return max(max_tokens, self.max_output_tokens)
        return max_tokens

    def rates(self, prompt_tokens: int) -> Rates:
        """The prices a request of ``prompt_tokens`` (input, cache writes and reads: the whole
        prompt) is billed at: the long-context ones, for all of it, over their threshold."""
        long = self.long_context
        if long is not None and prompt_tokens > long.above_tokens:
            return Rates(
                input_nanos=long.input_nanos,
                output_nanos=long.output_nanos,
                cache_write_5m_nanos=_or(long.cache_write_5m_nanos, self.cache_write_5m_nanos),
                cache_write_1h_nanos=_or(long.cache_write_1h_nanos, self.cache_write_1h_nanos),
                cache_read_nanos=_or(long.cache_read_nanos, self.cache_read_nanos),
            )
        return Rates(
            input_nanos=self.input_nanos,
            output_nanos=self.output_nanos,
            cache_write_5m_nanos=self.cache_write_5m_nanos,
            cache_write_1h_nanos=self.cache_write_1h_nanos,
            cache_read_nanos=self.cache_read_nanos,
        )

    def baseline_nanos(self, prompt_tokens: int, output_tokens: int) -> int:
        """The same tokens at this model's base input and output prices (its long-context
        ones over their threshold), no cache of any kind."""
        rates = self.rates(prompt_tokens)
        return prompt_tokens * rates.input_nanos + output_tokens * rates.output_nanos


def _or(rate: int | None, row_rate: int) -> int:
    """A long-context cache rate; absent only where the row has no such price (0)."""
    return row_rate if rate is None else rate


class ModelTable(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    models: dict[str, ModelSpec]
    auto: dict[Tier, str]

    @model_validator(mode="before")
    @classmethod
    def _ids_from_keys(cls, data: object) -> object:
        if isinstance(data, dict) and isinstance(data.get("models"), dict):
            data = dict(data)
            data["models"] = {
                key: {**row, "id": key} if isinstance(row, dict) else row
                for key, row in data["models"].items()
            }
        return data

    @model_validator(mode="after")
    def _auto_targets_exist(self) -> ModelTable:
        for tier, model_id in self.auto.items():
            spec = self.models.get(model_id)
            if spec is None or spec.tier != tier:
                raise ValueError(f"auto.{tier} = {model_id!r} is not a {tier}-tier model")
        ends = [tier for tier in (SMALLEST, LARGEST) if tier not in self.auto]
        if ends and set(self.auto) - {SMALLEST, LARGEST}:
            named = " and ".join(ends)
            raise ValueError(f"auto: a table with tiers between small and large names {named}")
        self._tiers_ordered_by_price()
        for spec in self.models.values():
            if spec.draft_model is None:
                continue
            draft = self.models.get(spec.draft_model)
            if draft is None or draft.provider != "simulated" or draft.draft_model is not None:
                raise ValueError(
                    f"models.{spec.id}: draft_model {spec.draft_model!r} must be a simulated "
                    "model of this table that has no draft of its own"
                )
        return self

    def _tiers_ordered_by_price(self) -> None:
        """A tier between small and large is priced at least as the one before it and at most
        as the one after, input and output alike (two tiers alone are not checked)."""
        tiers = self.tiers
        for cheaper, dearer in itertools.pairwise(tiers):
            a, b = self.for_tier(cheaper), self.for_tier(dearer)
            if len(tiers) > 2 and (
                b.input_nanos < a.input_nanos or b.output_nanos < a.output_nanos
            ):
                raise ValueError(
                    f"auto: tiers are ordered by price, and {dearer} ({b.id}: "
                    f"{b.input_nanos}/{b.output_nanos} nanos a token in/out) is cheaper than "
                    f"{cheaper} ({a.id}: {a.input_nanos}/{a.output_nanos})"
                )
        middle = tiers[1:-1]
        for one, two in itertools.pairwise(middle):
            if _price(self.for_tier(one)) == _price(self.for_tier(two)):
                raise ValueError(f"auto: tiers {one} and {two} have the same price")

    @property
    def tiers(self) -> tuple[Tier, ...]:
        """``auto``'s tiers, cheapest first: small, the tiers between by price, large."""
        middle = sorted(
            (t for t in self.auto if t not in (SMALLEST, LARGEST)),
            key=lambda t: (*_price(self.for_tier(t)), t),
        )
        ends = [t for t in (SMALLEST, LARGEST) if t in self.auto]
        return (*ends[:1], *middle, *ends[1:]) if len(ends) == 2 else (*ends, *middle)

    def get(self, model_id: str) -> ModelSpec | None:
        return self.models.get(model_id)

    def for_tier(self, tier: Tier) -> ModelSpec:
        return self.models[self.auto[tier]]

    def answering(self, model_id: str) -> tuple[ModelSpec, ...]:
        """The rows a request for ``model_id`` may be answered by: ``auto``'s tiers' (any may
        answer it: its band, a fallback), cheapest first as ``tiers``; else its own row
        (``model_id`` was validated as one)."""
        if model_id == AUTO:
            return tuple(self.for_tier(tier) for tier in self.tiers)
        spec = self.get(model_id)
        assert spec is not None  # validated before
        return (spec,)

    def baseline_for(self, model_id: str) -> ModelSpec:
        """The row a request for ``model_id`` is priced against (``auto``: its largest tier,
        whose price is the no-cache baseline); ``model_id`` was validated as a row."""
        spec = self.for_tier(LARGEST) if model_id == AUTO else self.get(model_id)
        assert spec is not None  # validated before
        return spec


def _price(spec: ModelSpec) -> tuple[int, int]:
    return (spec.input_nanos, spec.output_nanos)


# an unknown field: an older build refuses a newer table's fields (README "Upgrading")
_NOT_READ = " (not a field this version reads: a newer version's, or a misspelling)"


def one_line(exc: ValidationError) -> str:
    """pydantic's errors on one line (its own text takes several, with a URL each): a
    configuration error is the one line a service prints as it stops."""
    return "; ".join(
        f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
        f"{_NOT_READ if error['type'] == 'extra_forbidden' else ''}"
        if error["loc"]
        else error["msg"]
        for error in exc.errors(include_url=False)
    )


def load_model_table(path: Path | None = None) -> ModelTable:
    where = "services/common/models.toml" if path is None else str(path)
    try:
        if path is None:
            text = resources.files("services.common").joinpath("models.toml").read_text("utf-8")
        else:
            text = path.read_text(encoding="utf-8")
        return ModelTable.model_validate(tomllib.loads(text))
    except OSError as exc:
        raise ConfigError(f"model table {where}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"model table {where}: not UTF-8 (byte {exc.start}): save it as UTF-8"
        ) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"model table {where}: {exc}") from exc
    except ValidationError as exc:
        raise ConfigError(f"model table {where}: {one_line(exc)}") from exc
