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


def deep_path(text: str, limit: int = MAX_DEPTH) -> str:
    """Where in ``text`` (JSON, or its opening) an object or array first opens more than
    ``limit`` levels deep: the path of the member holding it, its first three names
    (``tools.0.input_schema``), "" when it is the top level or there is none. For a message
    when ``json`` could not read so deep (RecursionError): one pass, no recursion."""
    path: list[str] = []  # per open object or array: the member's name or index
    objects: list[bool] = []  # per open one: an object (else an array)
    want_key = False
    i, size = 0, len(text)
    while i < size:
        char = text[i]
        if char == '"':
            end = i + 1
            while end < size and text[end] != '"':
                end += 2 if text[end] == "\\" else 1
            if want_key:
                path[-1] = _key(text[i : end + 1])
                want_key = False
            i = end + 1
            continue
        if char in "{[":
            if len(objects) == limit:
                return ".".join(path[:3])[:SHOWN_CHARS]
            objects.append(char == "{")
            path.append("" if char == "{" else "0")
            want_key = char == "{"
        elif char in "}]" and objects:
            objects.pop()
            path.pop()
            want_key = False
        elif char == "," and objects:
            if objects[-1]:
                want_key = True
            else:
                path[-1] = str(int(path[-1]) + 1)
        i += 1
    return ""


def _key(quoted: str) -> str:
    try:
        key = json.loads(quoted)
    except ValueError:
        return quoted.strip('"')
    return key if isinstance(key, str) else quoted
