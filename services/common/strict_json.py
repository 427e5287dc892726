"""JSON as RFC 8259 has it, read strictly. Python's ``json`` also reads NaN, Infinity,
-Infinity, numbers beyond a double's range (as inf) and lone UTF-16 surrogate escapes, which
the providers' SDKs then refuse to encode (ValueError, UnicodeEncodeError): a request holding
one would fail at the replica, not where the caller can be told what to change. One reader for
the router's validation and the HTTP front."""

from __future__ import annotations

import json
import math
import re
from typing import Any

SHOWN_CHARS = 64  # the most of a number's text an error message repeats

# A UTF-16 surrogate written as an escape: only such an escape can put a lone one in the value
# (a protobuf string, and a request body read as UTF-8, hold none)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class NotStandardJson(ValueError):
    """A value Python's ``json`` reads but JSON (RFC 8259) has not: NaN, Infinity, -Infinity, or
    a number beyond a double's range."""


def _no_constant(name: str) -> object:
    raise NotStandardJson(f"{name} is not a JSON number (no NaN or Infinity)")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        cut = text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}..."
        raise NotStandardJson(f"{cut!r} is beyond the range of a double")
    return value


def loads(text: str) -> Any:
    """``json.loads`` that refuses what JSON has not (``NotStandardJson``, a ValueError); other
    invalid JSON raises ``json.JSONDecodeError`` (a ValueError) or RecursionError as usual."""
    return json.loads(text, parse_constant=_no_constant, parse_float=_finite)


# The deepest nesting of a JSON value the Gateway passes on (a tool's schema, a tool call's
# input): a provider's SDK encodes the body recursively, on a stack of its own depth, and a
# schema of ~970 levels, under what Python's json reads here, failed there with RecursionError:
# the request refused UNAVAILABLE "retry later" by every replica, a traceback logged on each.
# No schema or tool input has a tenth of this (OpenAI's strict schemas allow 10 levels).
MAX_DEPTH = 128


def nested_deeper_than(text: str, value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether ``value`` (read from ``text``) holds objects or arrays more than ``limit``
    levels deep (``{}`` is one level). Walked without recursion; a text with no more than
    ``limit`` brackets is not walked."""
    if text.count("{") + text.count("[") <= limit:
        return False
    stack: list[tuple[dict[str, Any] | list[Any], int]] = []
    if isinstance(value, dict | list):
        stack.append((value, 1))
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def holds_lone_surrogate(text: str, value: Any) -> bool:
    """Whether ``value``, read from ``text`` by ``loads``, holds a lone UTF-16 surrogate (an
    escaped pair decodes to one character; a lone one does not encode as UTF-8)."""
    if _SURROGATE_ESCAPE.search(text) is None:
        return False
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def object_or_none(text: str) -> dict[str, Any] | None:
    """The JSON object ``text`` holds, read strictly (``loads``, no lone surrogate), or None:
    not JSON, JSON but not an object, or nested too deeply to read."""
    try:
        value = loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, dict) or holds_lone_surrogate(text, value):
        return None
    return value


# What ``deep_path`` reads one step at a time: a string (whole, unterminated to the end), an
# object or array holding no other (whole: a flat one opens nothing deeper), a bracket or a
# comma; the rest (numbers, literals, colons, blanks) is skipped by the regex engine.
_STRING = r'"[^"\\]*(?:\\[\s\S][^"\\]*)*"'
_FLAT = r'[^{}\[\]"]*(?:' + _STRING + r'[^{}\[\]"]*)*'
# (the first string's closing quote made optional: one unterminated runs to the end)
_STEP = re.compile(rf"{_STRING}?|\{{{_FLAT}\}}|\[{_FLAT}\]|[{{}}\[\],]")
# The most steps ``deep_path`` takes before it gives up naming the place (None): a body of
# 12.6 MB whose deep member came last took 2.1 s to walk char by char in Python (9.8 s of many
# small members); 200,000 steps take ~0.1 s, and a schema's or a message's members fit many
# times over (a flat member or a whole string is one step).
MAX_DEEP_PATH_STEPS = 200_000


def deep_path(text: str, limit: int = MAX_DEPTH) -> list[str | int] | None:
    """Where in ``text`` (JSON, or its opening) an object or array first opens more than
    ``limit`` levels deep: the path of the member holding it (names and indices, ``[]`` when
    it is the top level), or None when there is none, or none within
    ``MAX_DEEP_PATH_STEPS`` steps. For a message when ``json`` could not read so deep
    (RecursionError): one pass, no recursion, bounded work."""
    path: list[str | int] = []  # per open object or array: the member's name or index
    objects: list[bool] = []  # per open one: an object (else an array)
    want_key = False
    for steps, step in enumerate(_STEP.finditer(text)):
        if steps == MAX_DEEP_PATH_STEPS:
            return None
        token = step.group()
        char = token[0]
        if char == '"':
            if want_key:
                path[-1] = _key(token)
                want_key = False
        elif char in "{[":  # an object or array opens (a flat one whole: nothing deeper)
            if len(objects) == limit:
                return path
            if len(token) > 1:
                want_key = False
                continue
            objects.append(char == "{")
            path.append("" if char == "{" else 0)
            want_key = char == "{"
        elif char in "}]":
            if objects:
                objects.pop()
                path.pop()
            want_key = False
        elif objects:  # a comma
            if objects[-1]:
                want_key = True
            else:
                index = path[-1]
                path[-1] = index + 1 if isinstance(index, int) else 0
    return None


def _key(quoted: str) -> str:
    try:
        key = json.loads(quoted)
    except ValueError:
        return quoted.strip('"')
    return key if isinstance(key, str) else quoted
