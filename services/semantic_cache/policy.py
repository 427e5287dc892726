"""What may be stored and for how long, per namespace.

- ``ttl_s``: the default absolute age of an entry; ``namespace_ttl_s`` overrides it for named
  namespaces (``SEMANTIC_CACHE_NAMESPACE_TTL_S=faq=604800,news=600``). An entry's expiry is
  fixed when it is stored (reads never extend it).
- ``max_temperature``: answers sampled above it are never stored (unset temperature = 1.0).
- ``tool_use_namespaces``: the only namespaces whose answers holding a tool call are stored
  and served (``SEMANTIC_CACHE_TOOL_USE_NAMESPACES=agent-readonly``); there a turn ending
  ``tool_use`` with a tool call is a whole answer, as ``end_turn`` is.
- ``present_time_namespaces``: the only namespaces where a question about the present
  (``present_time``: "What's today's date?", "What time is it now?", "the latest version of
  X"; English words only) is stored and looked up, for the namespace's TTL
  (``SEMANTIC_CACHE_PRESENT_TIME_NAMESPACES=news`` beside ``news=600``); elsewhere its answer
  would be served, stale, for the whole TTL (24 h by default).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from services.common.env import MAX_DURATION_S, ConfigError, Env
from services.common.errors import shown

NAMESPACE_TTL = "SEMANTIC_CACHE_NAMESPACE_TTL_S"
TOOL_USE_NAMESPACES = "SEMANTIC_CACHE_TOOL_USE_NAMESPACES"
PRESENT_TIME_NAMESPACES = "SEMANTIC_CACHE_PRESENT_TIME_NAMESPACES"
MAX_TEMPERATURE = "SEMANTIC_CACHE_MAX_TEMPERATURE"
# The highest sampling temperature a provider takes (OpenAI's 2; Anthropic's 1): a limit past
# it meant nothing (1e23 was taken). Answers sampled above the limit are never stored.
MOST_TEMPERATURE = 2.0


# Words that tie a question's answer to the moment it is asked (English only): a question
# whose last user turn holds one is answered by a model every time.
_PRESENT = re.compile(
    r"\b(?:todays?|tonight|now|nowadays|currently|current|latest|yesterday|tomorrow"
    r"|this\s+(?:week|weekend|month|year|morning|afternoon|evening)|at\s+the\s+moment)\b",
    re.IGNORECASE,
)
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r]*\n")
MAX_TTL_S = float(MAX_DURATION_S)  # ten years: a TTL beyond any use, well within int64 ms
# The shortest TTL: one second. A shorter one is a mistake, not a policy: 5e-324 s was taken,
# and an entry's expiry (whole milliseconds) was then its creation, so nothing was ever served
# (and every Store still paid for its embedding and its write). To cache nothing, turn L1 off.
MIN_TTL_S = 1.0
TTL_RANGE = f"at least {MIN_TTL_S:g} s and at most {MAX_TTL_S:.0f} s (10 years)"


def present_time(turn: str) -> str:
    """The first word of the question that ties its answer to the moment it is asked ("today",
    "now", "current", "latest", "tonight", "this week", "yesterday", "tomorrow"...; English
    only), "" when none; "Now" opening a sentence is not one. The question is the turn's last
    paragraph (after its last blank line): a document pasted above it ("... the current API
    ...\n\nSummarise this.") is not what is asked."""
    question = _PARAGRAPH_BREAK.split(turn)[-1]
    for found in _PRESENT.finditer(question):
        if found.group().lower() == "now" and _opens_sentence(question, found.start()):
            continue  # a sentence's first "Now" moves the talk on ("Now move it to May 17.")
        return found.group()
    return ""


def _opens_sentence(text: str, start: int) -> bool:
    """Before ``start``, past spaces, tabs, quotes and "(", is the text's start, a line break
    or ., !, ?, :. Read back from ``start``, never copied: a copy of the text up to each
    "Now" took 9 s of the event loop for "Now. " x 200,000 (1 MB)."""
    i = start - 1
    while i >= 0 and text[i] in " \t\"'(":
        i -= 1
    return i < 0 or text[i] in ".!?:\n"


def valid_ttl(ttl_s: float) -> bool:
    """A TTL in seconds: finite, at least ``MIN_TTL_S`` (1 s), at most ``MAX_TTL_S``."""
    return math.isfinite(ttl_s) and MIN_TTL_S <= ttl_s <= MAX_TTL_S


@dataclass(frozen=True)
class NamespacePolicy:
    ttl_s: float = 86_400.0
    namespace_ttl_s: Mapping[str, float] = field(default_factory=dict)
    max_temperature: float = 1.0
    tool_use_namespaces: frozenset[str] = frozenset()
    present_time_namespaces: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        for name, ttl in {"": self.ttl_s, **self.namespace_ttl_s}.items():
            if not valid_ttl(ttl):
                raise ValueError(f"ttl_s of namespace {name!r} must be {TTL_RANGE}, got {ttl}")
        if not 0 <= self.max_temperature <= MOST_TEMPERATURE:  # a NaN is not
            raise ValueError(
                f"max_temperature must be within [0, {MOST_TEMPERATURE:g}], "
                f"got {self.max_temperature}"
            )

    def ttl_ms(self, namespace: str, default_s: float | None = None) -> int:
        """The namespace's own TTL, else ``default_s`` (a tenant's policy), else ``ttl_s``."""
        fallback = self.ttl_s if default_s is None else default_s
        return round(self.namespace_ttl_s.get(namespace, fallback) * 1000)

    def allows_tool_use(self, namespace: str) -> bool:
        return namespace in self.tool_use_namespaces

    def present_time_reason(self, namespace: str, turn: str) -> str:
        """Why the question is neither stored nor looked up: it asks about the present, and
        the namespace does not cache such questions ("" = it may be cached)."""
        if namespace in self.present_time_namespaces or not (marker := present_time(turn)):
            return ""
        return (
            f"the question asks about the present ({marker!r}): its answer changes with time, "
            f"so it is neither stored nor looked up (namespace {shown(namespace)} is not in "
            f"{PRESENT_TIME_NAMESPACES})"
        )

    @classmethod
    def from_env(cls, env: Env, ttl_s: float) -> NamespacePolicy:
        overrides: dict[str, float] = {}
        for item in _items(env.optional_str(NAMESPACE_TTL)):
            name, sep, value = item.partition("=")
            try:
                seconds = float(value)
            except ValueError:
                seconds = math.nan
            if not sep or not name.strip() or not valid_ttl(seconds):
                raise ConfigError(
                    f"{NAMESPACE_TTL}: {item!r} must be namespace=seconds, the seconds {TTL_RANGE}"
                )
            if name.strip() in overrides:  # the last one won, silently
                raise ConfigError(f"{NAMESPACE_TTL}: namespace {name.strip()!r} is named twice")
            overrides[name.strip()] = seconds
        return cls(
            ttl_s=ttl_s,
            namespace_ttl_s=overrides,
            max_temperature=env.within(
                MAX_TEMPERATURE, 1.0, 0.0, MOST_TEMPERATURE, "a sampling temperature"
            ),
            tool_use_namespaces=frozenset(_items(env.optional_str(TOOL_USE_NAMESPACES))),
            present_time_namespaces=frozenset(_items(env.optional_str(PRESENT_TIME_NAMESPACES))),
        )


def _items(raw: str | None) -> list[str]:
    return [item.strip() for item in (raw or "").split(",") if item.strip()]
