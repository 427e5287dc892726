"""Strict reading of a JSON request body: each wrong type or unknown field is an ``ApiError``
that names the field by its path (``messages.1.content.0.text``), as the real APIs do."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from typing import Any

from services.common import strict_json
from services.http_front.errors import Api, ApiError, invalid

SHOWN_CHARS = 64  # the most of a caller's value an error message repeats


def shown(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value)[: SHOWN_CHARS + 1]
    if len(text) <= SHOWN_CHARS:
        return repr(text)
    return f"{text[:SHOWN_CHARS]!r}..."


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    return {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "array",
        dict: "object",
    }.get(type(value), type(value).__name__)


# A UTF-16 surrogate written as a JSON escape: legal JSON, but alone (a string cut in the middle
# of an emoji) it is no character, and no protobuf string can hold it.
LONE_SURROGATE = (
    "holds a lone UTF-16 surrogate escape (a \\uD800-\\uDFFF without its pair, e.g. a string "
    "cut in the middle of an emoji): not text"
)
TOO_DEEP = (
    f"must be JSON nested at most {strict_json.MAX_DEPTH} levels deep (objects and arrays), got"
    " one nested deeper"
)
_NOT_UTF8 = "the request body is not UTF-8 text: send the JSON encoded as UTF-8"


# The members of either API whose value is the caller's own JSON (a tool's schema, a tool
# call's input, a response format's schema, metadata): a too-deep member's path is named up to
# the first of them, the field the caller sets (``tools[0].function.parameters``, not the
# ~128 steps into the schema where it passed the bound); a path through none of them is cut
# at ``SHOWN_PATH_STEPS`` steps.
_FREE_JSON = frozenset({"input_schema", "parameters", "input", "schema", "metadata"})
SHOWN_PATH_STEPS = 6


def _shown_path(path: list[str | int] | None, api: Api) -> str:
    """``path`` to its field as ``api`` names one: Anthropic's ``tools.0.input_schema``,
    OpenAI's ``tools[0].function.parameters``; "" for none (or the top level)."""
    shown = ""
    for step in (path or [])[:SHOWN_PATH_STEPS]:
        if isinstance(step, int):
            shown += f"[{step}]" if api == "openai" else f".{step}"
        else:
            shown += f".{step}"
            if step in _FREE_JSON:
                break
    return shown.lstrip(".")[: strict_json.SHOWN_CHARS * 2]


# A path into the Gateway's request, as its refusals write one (and Chat Completions): messages[i]
# or system[i] or tools[i], a block's .content[j], and the dotted field names that follow. Each
# front rewrites it into its caller's (``openai_api.at_caller``, ``anthropic_api.at_caller``).
GATEWAY_PATH = re.compile(
    r"\b(?:messages\[(\d+)\](?:\.content\[(\d+)\])?|system\[(\d+)\]|tools\[(\d+)\])"
    r"((?:\.[A-Za-z_]+)*)"
)
# a value a message quotes, as ``repr`` (``services.common.errors.shown``) quotes it: an opening
# quote no letter precedes (the Gateway's, tenants')
_QUOTED = re.compile(r"""(?<!\w)(?:'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")""")


# Where a provider's own words begin in a refusal a model replica passed on (its provider's 400,
# ``ProviderApi._refused``: "openai refused the request (400): <what it said>"): they name the
# provider's request, in the provider's form and by its indices (OpenAI's count the system
# message), not the Gateway's request nor the caller's
_PROVIDER_SAID = re.compile(r"\brefused the request(?: \([^)]*\))?: ")


# The Gateway's enum names of the roles (its refusals say "the first message must be the
# user's (ROLE_USER)"), which no HTTP caller sends: each API's caller sends ``"role": "user"``.
_ROLES = {"ROLE_USER": "user", "ROLE_ASSISTANT": "assistant"}
_ROLE_ASIDE = re.compile(r" \((ROLE_USER|ROLE_ASSISTANT)\)")
_ROLE = re.compile(r"\b(ROLE_USER|ROLE_ASSISTANT)\b")


def role_names(part: str, api: Api) -> str:
    """``part`` of a Gateway refusal with its roles in ``api``'s words: a role named aside
    ("the user's (ROLE_USER)") is the Messages API's field (``("role": "user")``), or dropped
    for Chat Completions (its words said it already); one named alone is the role's value
    (``'user'``; ``user``)."""
    if api == "anthropic":
        part = _ROLE_ASIDE.sub(lambda m: f' ("role": "{_ROLES[m[1]]}")', part)
        return _ROLE.sub(lambda m: f"'{_ROLES[m[1]]}'", part)
    part = _ROLE_ASIDE.sub("", part)
    return _ROLE.sub(lambda m: _ROLES[m[1]], part)


def unquoted(message: str, change: Callable[[str], str]) -> str:
    """``message`` with ``change`` made to the Gateway's own words: its text outside the
    values it quotes (the caller's own, as ``shown`` quotes them: a tool_call_id of
    'messages[0].text' is an id, not a path, and was shown as 'messages[1].text') and before
    a provider's words it passes on (``_PROVIDER_SAID``), which are quoted as said."""
    provider = _PROVIDER_SAID.search(message)
    ours = message if provider is None else message[: provider.start()]
    parts: list[str] = []
    start = 0
    for quoted in _QUOTED.finditer(ours):
        parts += [change(ours[start : quoted.start()]), quoted[0]]
        start = quoted.end()
    parts.append(change(ours[start:]))
    return "".join(parts) + message[len(ours) :]


def parse_body(raw: bytes, api: Api) -> dict[str, Any]:
    """The body as a JSON object, or a 400 that says what is wrong with it (a field named as
    ``api`` names it). The body must be
    UTF-8 (a UTF-8 byte order mark is skipped), as the providers' APIs require: ``json.loads``
    would read UTF-16 and UTF-32 too, which no caller of these APIs means to send."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise invalid(_NOT_UTF8) from None
    if "\0" in text:  # no JSON text holds a raw NUL; UTF-16 and UTF-32 text does
        raise invalid(f"{_NOT_UTF8} (it holds NUL bytes, as UTF-16 and UTF-32 do)")
    try:
        value = strict_json.loads(text)
    except ValueError as exc:
        raise invalid(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:  # deeper than Python's json reads (~1,000 levels)
        where = _shown_path(strict_json.deep_path(text), api)
        raise invalid(f"{where or 'the request body'}: {TOO_DEEP}", where or None) from None
    if strict_json.holds_lone_surrogate(text, value):
        raise invalid(f"the request body {LONE_SURROGATE}")
    if not isinstance(value, dict):
        raise invalid(f"the request body must be a JSON object, got {_type_name(value)}")
    return value


class Obj:
    """One JSON object of the request at ``path``, read field by field."""

    def __init__(self, value: object, path: str) -> None:
        if not isinstance(value, dict):
            raise invalid(f"{path or 'body'}: expected an object, got {_type_name(value)}", path)
        self.value: dict[str, Any] = value
        self.path = path

    def at(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def only(self, allowed: Iterable[str]) -> None:
        """Unknown fields are refused, as the APIs refuse them."""
        known = set(allowed)
        for name in self.value:
            if name not in known:
                raise invalid(f"{self.at(name)}: Extra inputs are not permitted", self.at(name))

    def has(self, name: str) -> bool:
        return self.value.get(name) is not None

    def raw(self, name: str) -> Any:
        return self.value.get(name)

    def _required(self, name: str) -> Any:
        if name not in self.value:
            raise invalid(f"{self.at(name)}: Field required", self.at(name))
        return self.value[name]

    def _wrong(self, name: str, expected: str, value: object) -> ApiError:
        return invalid(
            f"{self.at(name)}: expected {expected}, got {_type_name(value)}", self.at(name)
        )

    def wrong_type(self, name: str, expected: str) -> ApiError:
        """A 400 naming the field, what it takes (``expected``) and the type it got."""
        return self._wrong(name, expected, self.value.get(name))

    def _typed(self, name: str, required: bool, kind: type, expected: str) -> Any:
        """The field's value when it has ``kind`` (a bool is no number here), None when it is
        absent and not required; else a 400 naming the field and the type it needs."""
        value = self._required(name) if required else self.value.get(name)
        if value is None and not required:
            return None
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise self._wrong(name, expected, value)
        return value

    def text(self, name: str, *, required: bool = False) -> str | None:
        value: str | None = self._typed(name, required, str, "a string")
        return value

    def integer(self, name: str, *, required: bool = False) -> int | None:
        value: int | None = self._typed(name, required, int, "an integer")
        return value

    def number(self, name: str) -> float | None:
        value = self._typed(name, False, int | float, "a number")  # type: ignore[arg-type]
        if value is None:
            return None
        if not math.isfinite(value):
            raise invalid(f"{self.at(name)}: must be a finite number", self.at(name))
        return float(value)

    def flag(self, name: str) -> bool | None:
        value: bool | None = self._typed(name, False, bool, "a boolean")
        return value

    def array(self, name: str, *, required: bool = False) -> list[Any] | None:
        value: list[Any] | None = self._typed(name, required, list, "an array")
        return value

    def obj(self, name: str, *, required: bool = False) -> Obj | None:
        value = self._required(name) if required else self.value.get(name)
        if value is None and not required:
            return None
        return Obj(value, self.at(name))


# why a sampling field the Gateway has no place for is refused
SAMPLING = "the Gateway passes on temperature alone, no other sampling setting"


def unsupported(where: str, why: str, instead: str = "omit it") -> ApiError:
    """A field the Gateway has no place for: refused, never dropped silently."""
    return invalid(f"{where}: not supported by cachemesh ({why}); {instead}", where)


def default_only(obj: Obj, name: str, default: float, why: str) -> None:
    """A number field accepted at the value that changes nothing (``default``), else refused."""
    value = obj.number(name)
    if value is not None and value != default:
        where = obj.at(name)
        raise invalid(
            f"{where}: {value:g} is not supported by cachemesh ({why}); omit it or send "
            f"{default:g}",
            where,
        )


def json_text(value: object, where: str) -> str:
    """A JSON value (a tool's input or schema) as the Gateway's JSON text field."""
    if not isinstance(value, dict):
        raise invalid(f"{where}: expected an object, got {_type_name(value)}", where)
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    try:  # a value decoded from a JSON string of the body (tool-call arguments) may hold one
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(f"{where}: {LONE_SURROGATE}", where) from None
    return text


def answered_input(input_json: str) -> tuple[dict[str, Any], str]:
    """A tool call's input as the Gateway answered it: the JSON object, and its text. One that
    is no standard JSON object (an answer stored before the model adapter read inputs
    strictly) is kept visibly as ``{"_unparsed_arguments": <the text>}``, as the adapter keeps
    it: served as read, a lone surrogate escape failed to encode after the answer was billed,
    and a NaN reached the client as a body it could not send back."""
    text = input_json.strip() or "{}"
    value = strict_json.object_or_none(text)
    if value is None:
        value = {"_unparsed_arguments": input_json}
        text = json.dumps(value)
    return value, text
