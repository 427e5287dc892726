"""What a provider's refusal means for the request: retry, the caller's fault, our
credentials, or give up. Both official SDKs raise ``APIStatusError`` (status code, body,
response headers), ``APITimeoutError`` and ``APIConnectionError``; an error event inside a
stream (Anthropic's ``event: error``, an OpenAI chunk carrying ``error``) is an
``APIStatusError`` too, whose body names the error type; an OpenAI-compatible engine's (vLLM's
``{"error": {"type": "BadRequestError", "code": 400}}``) names its HTTP status in ``code``,
which counts as the status: a 400 is the request's, a 500 is retried. The anthropic SDK does
not wrap an error of its HTTP stack while it reads a stream (the connection lost mid-stream): an
``httpx2.TransportError`` is a lost connection too. A stream that ends without its final event
(``StreamCut``) was cut as well, however cleanly its connection closed. A stream that breaks
after the final event (only ``[DONE]`` / ``message_stop`` missing: the connection lost, an
error event or chunk, a chunk the adapter could not read) is no failure: the answer and its
usage came whole, and the adapters end such a stream as answered (``lost_after_end``). A
request the adapter or the SDK cannot encode as the provider's body (``Unsendable``) was never
sent: the request's fault, like a 400.

Only a 401 or an error whose type (or OpenAI ``code``) names our credentials
(``authentication_error``, ``permission_error``, ``invalid_api_key``) is ``AUTH``. Any other 403
is this replica's: OpenAI's ``model_not_found`` ("Project ... does not have access to model
...", a key that may not use one model and still serves every other), its
``request_forbidden`` / ``unsupported_country_region_territory`` (a key used from where it may
not be): ``FATAL``, another replica may serve the request. A caller names a row of the model
table, never the provider's model: which model a replica asks for, and with which key, is the
operator's set-up.

An account that cannot pay is ``ACCOUNT``, whatever status it comes with: Anthropic's 400
``invalid_request_error`` "Your credit balance is too low to access the Anthropic API" (typed
as the request's, yet every request of every tenant gets it), its ``billing_error``, and
OpenAI's 429 ``insufficient_quota`` ("You exceeded your current quota": a 429 no wait makes
pass, unlike a rate limit). Like ``AUTH`` it is the replica's, until someone adds credit.

A rate limit (429) is retried, but not one that the request alone is over: OpenAI's 429
``rate_limit_exceeded`` "Request too large for gpt-4o in organization ... on tokens per min
(TPM): Limit 30000, Requested 45000. The input or output tokens must be reduced in order to run
successfully." (Groq's the same, "please reduce your message size"). No wait makes it pass, on
this replica or another of the account: ``TOO_LARGE`` (``Over.TOKEN_RATE``), the request's. It
is told by the message's "request too large" or by its own figures, a ``Requested`` count over
the ``Limit`` (a "Rate limit reached ... Limit 30000, Used 29000, Requested 2000" is waited
for).

Anthropic's 429 ``rate_limit_error`` says the same "This request would exceed the rate limit for
your organization (...) of 30,000 input tokens per minute" whether the minute's other requests or
the request alone is over it, with no count of the request. Its limit is in the message and in
the ``anthropic-ratelimit-input-tokens-limit`` header (OpenAI's ``x-ratelimit-limit-tokens``;
not ``anthropic-ratelimit-tokens-limit``, which shows the most restrictive limit in effect, the
output's maybe): ``Failure.token_limit``. The caller, which knows the request's own input, tells
(``alone_over``) whether it is over that limit by itself: then ``TOO_LARGE`` too, else retried.

A 404 is the replica's too (``FATAL``): about the model (OpenAI's ``model_not_found``,
Anthropic's ``not_found_error`` "model: claude-...", vLLM's "The model `...` does not exist",
Ollama's 'model "..." not found': ``about_a_model``), the model it asks for is not served there
(``MODEL_UPSTREAM_IDS``, the engine's loaded model, a retired model); else its base URL lacks
its ``/v1`` or names a path the engine does not serve (vLLM's ``{"detail": "Not Found"}``).
Either fails every request on this replica and none on one set up right. A body without an
error message is quoted (bounded; redacted by the caller like any message).

An error's type and code are the provider's text, like its message: a proxy or an
OpenAI-compatible engine may put anything there (its own words, the key it was sent). Each is
taken only as a short identifier (``[A-Za-z0-9_.-]{1,64}``: every type and code the providers
document is one), else as ``"error"`` (a code: none); the caller still redacts both before
they leave the adapter.
"""

from __future__ import annotations

import dataclasses
import email.utils
import enum
import json
import logging
import math
import re
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import httpx2

if TYPE_CHECKING:
    import anthropic
    import openai

# The provider SDKs, each imported by a replica of its own backend only (``wiring``): the
# other's import cost every replica about a second and a half of CPU at start (anthropic's
# 1.8 s, openai's 0.5 s), its objects held for good. An exception of an SDK's type can only be
# raised where that SDK is imported, so the SDKs looked for are those this process has.
_SDKS = ("anthropic", "openai")


def _sdk_types(name: str) -> tuple[type[Exception], ...]:
    """The class ``name`` (``APIStatusError``, ...) of each provider SDK this process imported."""
    loaded = (sys.modules.get(sdk) for sdk in _SDKS)
    return tuple(getattr(module, name) for module in loaded if module is not None)


class Kind(enum.Enum):
    RETRY = "retry"  # 408 / 409 / 429 / 5xx / 529, overloaded or rate limited, connection lost
    CLIENT = "client"  # 400 / 422, a 403 or 404 about the model: the request is wrong
    # 413, a prompt over the model's context window, or a request alone over the account's
    # per-minute token limit (a 429 no wait makes pass): the request's, RESOURCE_EXHAUSTED
    TOO_LARGE = "too_large"
    AUTH = "auth"  # 401, or an auth error type: our credentials; the replica is NOT_SERVING
    ACCOUNT = "account"  # no credit / quota on our account: like AUTH, NOT_SERVING
    FATAL = "fatal"  # anything else (another 403 or 404 too): no retry, the next replica


class Over(enum.Enum):
    """What a ``TOO_LARGE`` request is over."""

    CONTEXT_WINDOW = "context_window"  # the model's (a 400 on the HTTP front)
    SIZE_LIMIT = "size_limit"  # the provider's request size (a 413)
    TOKEN_RATE = "token_rate"  # the account's tokens per minute (or day), by itself


@dataclass(frozen=True)
class Failure:
    kind: Kind
    status: int  # HTTP status, 0 when there was none (connection, timeout)
    # the provider's error type (a short identifier, else "error"; not yet redacted), or the
    # exception's name
    error_type: str
    message: str  # the provider's message (not yet redacted)
    retry_after_s: float | None
    # a rate limit's tokens a minute (or day) by the provider's headers or words, when it does
    # not count the request itself (Anthropic's): what ``alone_over`` compares the request with
    token_limit: int | None = None
    # the request's own input tokens by our estimate, when ``alone_over`` found them over it
    request_tokens: int | None = None
    # its words (or OpenAI's code) are about the model asked for (``about_a_model``)
    about_model: bool = False
    # ``message`` is the provider's own text (its error body, or an error event in its
    # stream), which may name the operator's account: not the connection's, nor ours
    from_provider: bool = False
    # the provider's id of the call (its error's ``request-id`` / ``x-request-id`` header, as
    # the SDK read it: ``request_id_shown``'s, not yet checked for a credential); "" if none
    request_id: str = ""
    # OpenAI's ``error.code`` and ``error.param`` ("invalid_value", "messages[0].content"),
    # each a short identifier (``_identifier``, ``_param_of``), else ""
    code: str = ""
    param: str = ""


# a provider's id of a request as it may be shown (Anthropic's ``request-id``,
# "req_011CSHoEeqs5C35K2UUqR7Fy"; OpenAI's ``x-request-id``, "req_" and 32 hex digits; an
# engine's or a proxy's): a short identifier, else not shown (a header is any text a proxy
# puts there)
_REQUEST_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
# the log field naming the provider's id of the call (Anthropic's ``request-id`` header,
# OpenAI's ``x-request-id``): what an operator hands the provider
REQUEST_ID_FIELD = "provider_request_id"


def request_id_shown(value: object) -> str:
    """``value`` (a response header's) if it is a request id that may be shown, else ""."""
    return value if isinstance(value, str) and _REQUEST_ID.fullmatch(value) else ""


# (vLLM names an error by its exception's class: BadRequestError, InternalServerError)
_RETRY_TYPES = {
    "overloaded_error",
    "rate_limit_error",
    "api_error",
    "server_error",
    "timeout",
    "InternalServerError",
}
_CLIENT_TYPES = {"invalid_request_error", "BadRequestError"}
# a request over the provider's size limit (Anthropic's 413) or a prompt over the model's
# context window (llama-server's type, OpenAI's code)
_TOO_LARGE_TYPES = {"request_too_large", "exceed_context_size_error", "context_length_exceeded"}
# the start of the messages that tell a prompt over the context window under no type of its
# own: Anthropic's 400 "prompt is too long: 210000 tokens > 200000 maximum", vLLM's
# BadRequestError (OpenAI's wording) "This model's maximum context length is 2048 tokens. ..."
_TOO_LONG = ("prompt is too long", "this model's maximum context length")
_AUTH_TYPES = {"authentication_error", "permission_error", "invalid_api_key"}
_ACCOUNT_TYPES = {"billing_error", "insufficient_quota"}
# the start of Anthropic's 400 for an account without credit (at the start only: a message
# that quotes the request, a tool's name say, must not take a replica out)
_NO_CREDIT = "your credit balance is too low"
_ONE_MODEL = "model_not_found"  # OpenAI's 403 / 404 code when the key may not use this model
# a 404's type (Anthropic's; vLLM names its exception's class)
_NOT_FOUND_TYPES = {"not_found_error", "NotFoundError"}
# a 404's message about a model: Anthropic's "model: claude-...", vLLM's "The model `x` does
# not exist.", Ollama's 'model "x" not found'
_ABOUT_A_MODEL = re.compile(r"\bmodel\b", re.IGNORECASE)
# a rate limit's type or code (Anthropic's type, OpenAI's code; OpenAI's type names the limit)
_RATE_LIMITED = {"rate_limit_error", "rate_limit_exceeded", "tokens", "requests"}
# a rate limit's refusal of the request itself: OpenAI's and Groq's "Request too large for ..."
_REQUEST_TOO_LARGE = re.compile(r"\brequest (?:is )?too large\b", re.IGNORECASE)
# the figures a rate limit's message names: "Limit 30000, Used 29000, Requested 2000"
_LIMIT = re.compile(r"\blimit:?\s*(\d[\d,]*(?:\.\d+)?)", re.IGNORECASE)
_REQUESTED = re.compile(r"\brequested:?\s*(\d[\d,]*(?:\.\d+)?)", re.IGNORECASE)
# Anthropic's words for its input token limit: "... of 30,000 input tokens per minute" (or day)
_INPUT_LIMIT = re.compile(r"\b(\d[\d,]*)\s+input tokens per (?:minute|day)\b", re.IGNORECASE)
# the response headers that name the account's input tokens a minute: Anthropic's input limit,
# OpenAI's tokens limit (``anthropic-ratelimit-tokens-limit`` is the most restrictive limit in
# effect, which may be the output's: never taken)
_TOKEN_LIMIT_HEADERS = ("anthropic-ratelimit-input-tokens-limit", "x-ratelimit-limit-tokens")
# our estimate of a request's input (the row's tokenizer, not the provider's: cl100k_base is not
# Claude's) may be over the provider's count by this much before the request counts as over a
# limit by itself: one within it is retried, as a limit a wait may pass
ESTIMATE_MARGIN = 1.10
# a body without an error message, quoted as the message: at most this much of it (the caller
# cuts it further, to an error message's length, once redacted)
_QUOTED_BODY_CHARS = 2000
_IDENTIFIER = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# a request's field as OpenAI's ``param`` names it: "messages[0].content", "tools[2].function"
_PARAM = re.compile(r"[A-Za-z0-9_.\[\]-]{1,128}")
# the field path Anthropic's 400 message begins with, its ``param`` (its error has none):
# "max_tokens: 64000 > 32000, which is the maximum...", "messages.1.content.0: unexpected
# `tool_use_id` found in `tool_result` blocks", "tools.0.custom.input_schema: JSON schema is
# invalid": a model-table mistake and a translation bug of ours are told apart by it
_LEADING_FIELD = re.compile(r"[a-z_]+(?:\.[A-Za-z0-9_]+)*(?=: )")
# the statuses whose body is about our key or account and never echoes the request (401, 403):
# their message (redacted) is on the operator's line, which says what to fix ("Missing scopes:
# model.request" is not a wrong key)
_ABOUT_OUR_KEY = (401, 403)


class StreamCut(Exception):
    """The provider's stream ended before its final event (no stop or finish reason)."""


class Unsendable(Exception):
    """The request could not be built or encoded as the provider's body (a value JSON does not
    have: NaN, Infinity, a lone surrogate; a value nested too deeply to encode): the request's
    fault, never the replica's."""


# what building the body or the SDK's encoding of it raises on such a value (json.dumps with
# allow_nan=False: ValueError; a lone surrogate to UTF-8: UnicodeEncodeError; a schema nested
# deeper than the SDK's encoder recurses: RecursionError, which was a FATAL of the replica:
# UNAVAILABLE "retry later" from every replica, each logging a traceback)
ENCODING_ERRORS = (ValueError, TypeError, UnicodeError, RecursionError)
UNSENDABLE = "unsendable"  # the error type of such a Failure


@contextmanager
def never_sent() -> Iterator[None]:
    """Around building a provider's body and the SDK call that encodes it: what that raises
    on a value JSON does not have (``ENCODING_ERRORS``) is ``Unsendable``, never sent."""
    try:
        yield
    except ENCODING_ERRORS as exc:
        raise Unsendable(f"{type(exc).__name__}: {exc}") from exc


def _transport_errors() -> tuple[type[Exception], ...]:
    """The connection lost (or timed out) while a stream is read, as each SDK raises it, or
    the stream cut before its final event."""
    # httpx2.TransportError includes its timeouts
    return (*_sdk_types("APIConnectionError"), httpx2.TransportError, StreamCut)


log = logging.getLogger("cachemesh.model")


def lost_after_end(backend: str, model: str, exc: Exception, request_id: str = "") -> None:
    """The stream broke after its final event (the end and the usage came, only the end
    marker did not: the connection lost, an error event, a chunk not read): the answer ends as
    answered; one line says so (the exception's type only: its text may quote the provider),
    with the provider's id of the call (``Progress.request_id``)."""
    log.info(
        "%s stream of %s broke after its final event (%s): answered, billed as reported",
        backend,
        model,
        type(exc).__name__,
        extra=request_id_fields(request_id),
    )


def request_id_fields(request_id: str) -> Mapping[str, object] | None:
    """A log line's ``extra``: the provider's id of its call as a field (none: no field)."""
    return {"fields": {REQUEST_ID_FIELD: request_id}} if request_id else None


def classify(exc: Exception) -> Failure:
    if isinstance(exc, Unsendable):  # never sent: the provider did not refuse it, nor fail
        return Failure(Kind.CLIENT, 0, UNSENDABLE, str(exc), None)
    if isinstance(exc, _sdk_types("APIStatusError")):
        exc = cast("anthropic.APIStatusError | openai.APIStatusError", exc)
        status = int(exc.status_code)
        error_type, message = _error_of(exc.body, str(exc))
        code = _code_of(exc.body)
        kind = _kind(status, error_type, code, message)
        headers = exc.response.headers
        limit = _token_limit(kind, status, error_type, message, headers)
        about = about_a_model(code, message)
        wait = _retry_after(headers)
        return Failure(
            kind,
            status,
            error_type,
            message,
            wait if wait is not None else _wait_in_words(kind, message),
            limit,
            about_model=about,
            from_provider=True,
            request_id=request_id_shown(exc.request_id),
            code=code,
            param=_param(exc, message),
        )
    if isinstance(exc, _transport_errors()):  # includes the SDKs' APITimeoutError
        return Failure(Kind.RETRY, 0, type(exc).__name__, str(exc), None)
    if isinstance(exc, _sdk_types("APIError")):  # an error chunk in a stream
        exc = cast("anthropic.APIError | openai.APIError", exc)
        error_type, message = _error_of(exc.body, str(exc))
        status = _status_in(exc.body)
        code = _code_of(exc.body)
        kind = _kind(status, error_type, code, message)
        limit = _token_limit(kind, status, error_type, message, None)
        about = about_a_model(code, message)
        wait = _wait_in_words(kind, message)
        return Failure(
            kind,
            status,
            error_type,
            message,
            wait,
            limit,
            about_model=about,
            from_provider=True,
            code=code,
            param=_param(exc, message),
        )
    return Failure(Kind.FATAL, 0, type(exc).__name__, str(exc) or type(exc).__name__, None)


def _kind(status: int, error_type: str, code: str = "", message: str = "") -> Kind:
    if error_type in _AUTH_TYPES or code in _AUTH_TYPES or status == 401:
        return Kind.AUTH
    if (
        error_type in _ACCOUNT_TYPES
        or code in _ACCOUNT_TYPES
        or message.lower().startswith(_NO_CREDIT)
    ):
        return Kind.ACCOUNT
    if (
        status == 429 or error_type in _RATE_LIMITED or code in _RATE_LIMITED
    ) and alone_over_a_rate_limit(message):
        return Kind.TOO_LARGE  # no wait makes it pass
    if status == 404 or error_type in _NOT_FOUND_TYPES:  # this replica's set-up (its model,
        # its base URL): another replica may serve
        return Kind.FATAL
    if error_type in _RETRY_TYPES or status in (408, 409, 429, 529) or status >= 500:
        return Kind.RETRY
    if status == 403:  # this replica's account's (a key that may not use this model too)
        return Kind.FATAL
    if (
        error_type in _TOO_LARGE_TYPES
        or code in _TOO_LARGE_TYPES
        or status == 413
        or message.lower().startswith(_TOO_LONG)
    ):
        return Kind.TOO_LARGE
    if error_type in _CLIENT_TYPES or status in (400, 422):
        return Kind.CLIENT
    return Kind.FATAL


def about_a_model(code: str, message: str) -> bool:
    """A 404 (or a not-found error, a 403) about the model the replica asked for."""
    return code == _ONE_MODEL or _ABOUT_A_MODEL.search(message) is not None


def alone_over_a_rate_limit(message: str) -> bool:
    """A rate limit's message saying that the request by itself is over the limit: "Request
    too large for ...", or a ``Requested`` count over the ``Limit`` it names."""
    return _REQUEST_TOO_LARGE.search(message) is not None or _requested_over_limit(message)


def _requested_over_limit(message: str) -> bool:
    limit, requested = _LIMIT.search(message), _REQUESTED.search(message)
    if limit is None or requested is None:
        return False
    return _figure(requested[1]) > _figure(limit[1])


def _figure(text: str) -> float:
    return float(text.replace(",", ""))


def _token_limit(
    kind: Kind, status: int, error_type: str, message: str, headers: Any
) -> int | None:
    """A retried rate limit's tokens a minute (or day), by its headers, else its words; None
    for any other failure, and for one whose message counts the request itself (OpenAI's
    ``Requested``: the provider's count, which ``alone_over_a_rate_limit`` already judged)."""
    if kind != Kind.RETRY or not (status == 429 or error_type in _RATE_LIMITED):
        return None
    if _REQUESTED.search(message) is not None:
        return None
    for name in _TOKEN_LIMIT_HEADERS:
        try:
            value = headers.get(name) if headers is not None else None
            limit = int(str(value).strip()) if value is not None else 0
        except (TypeError, ValueError, AttributeError):
            limit = 0
        if limit > 0:
            return limit
    if (words := _INPUT_LIMIT.search(message)) is not None and (limit := int(_figure(words[1]))):
        return limit
    return None


def alone_over(failure: Failure, request_tokens: int) -> Failure:
    """``failure`` as ``TOO_LARGE`` when it is a rate limit (``token_limit``) that the request's
    own input, ``request_tokens`` by our estimate, is over by itself, past the estimate's margin
    (``ESTIMATE_MARGIN``): no wait makes it pass. Else ``failure`` as it is, retried."""
    limit = failure.token_limit
    if failure.kind != Kind.RETRY or limit is None or request_tokens <= limit * ESTIMATE_MARGIN:
        return failure
    return dataclasses.replace(failure, kind=Kind.TOO_LARGE, request_tokens=request_tokens)


def over(failure: Failure) -> Over:
    """What a ``TOO_LARGE`` failure's request is over."""
    if failure.status == 413 or failure.error_type == "request_too_large":
        # (Groq answers its "Request too large ... on tokens per minute (TPM): Limit 6000,
        # Requested 6294" with a 413: its figures tell it from a body over a size limit)
        return Over.TOKEN_RATE if _requested_over_limit(failure.message) else Over.SIZE_LIMIT
    if failure.request_tokens is not None or alone_over_a_rate_limit(failure.message):
        return Over.TOKEN_RATE
    return Over.CONTEXT_WINDOW


def _error_of(body: object, fallback: str) -> tuple[str, str]:
    """The provider's error type and message from its error body: Anthropic's
    ``{"type": "error", "error": {"type", "message"}}``, OpenAI's
    ``{"error": {"message", "type", "code"}}`` (the SDK may hand over the inner object)."""
    inner: Any = body.get("error", body) if isinstance(body, dict) else None
    if isinstance(inner, dict):
        error_type = _identifier(inner.get("type") or inner.get("code")) or "error"
        message = inner.get("message")
        return error_type, str(message) if message else _quoted(body)
    if isinstance(body, str) and body:
        return "error", _bounded(body)
    return "error", fallback


def _quoted(body: object) -> str:
    """A body without an error message (vLLM's ``{"detail": "Not Found"}``), as the message:
    its JSON, bounded (the SDK's own text says only "Error code: 404")."""
    try:
        return _bounded(json.dumps(body, ensure_ascii=False))
    except (TypeError, ValueError):  # not JSON's (a value JSON does not have): its repr
        return _bounded(repr(body))


def _bounded(text: str) -> str:
    return text[:_QUOTED_BODY_CHARS] + "..." if len(text) > _QUOTED_BODY_CHARS else text


def _status_in(body: object) -> int:
    """The HTTP status an error event inside a stream names as its ``code`` (vLLM's
    ``{"error": {"type": "BadRequestError", "code": 400}}``; an int or a numeric string), else
    0: the stream's own status was 200."""
    inner: Any = body.get("error", body) if isinstance(body, dict) else None
    code = inner.get("code") if isinstance(inner, dict) else None
    if isinstance(code, str) and code.isascii() and code.isdigit():
        code = int(code)
    if isinstance(code, int) and not isinstance(code, bool) and 400 <= code <= 599:
        return code
    return 0


def _code_of(body: object) -> str:
    """OpenAI's ``error.code`` (``invalid_api_key``, ``model_not_found``), else empty."""
    inner: Any = body.get("error", body) if isinstance(body, dict) else None
    return _identifier(inner.get("code")) if isinstance(inner, dict) else ""


def _param(exc: anthropic.APIError | openai.APIError, message: str) -> str:
    """The request's field an SDK error names: OpenAI's ``error.param`` (``_param_of``), else
    the field path an Anthropic message begins with (``_anthropics_param``), else empty."""
    return _param_of(exc.body) or _anthropics_param(exc, message)


def _param_of(body: object) -> str:
    """OpenAI's ``error.param``, the request's field it names ("messages[0].content",
    "tools[2].function.name"), when it is a short field path, else empty: a proxy's or an
    engine's param may be any text."""
    inner: Any = body.get("error", body) if isinstance(body, dict) else None
    value = inner.get("param") if isinstance(inner, dict) else None
    return value if isinstance(value, str) and _PARAM.fullmatch(value) else ""


def _anthropics_param(exc: Exception, message: str) -> str:
    """The field path an Anthropic SDK error's message begins with (``_LEADING_FIELD``), else
    empty; any other SDK's message is not read so (an engine's "error: ..." is no field)."""
    if type(exc).__module__.partition(".")[0] != "anthropic":
        return ""
    found = _LEADING_FIELD.match(message)
    return found[0] if found is not None and _PARAM.fullmatch(found[0]) else ""


def for_the_operator(failure: Failure, *, hosted: bool) -> str:
    """What an operator's line says of a refusal of our key or account: its ``identifiers``,
    and for a 401 or 403 of a ``hosted`` provider (OpenAI's or Anthropic's own API, whose
    bodies of these statuses are about the key, never echoing the request: "Missing scopes:
    model.request") the provider's message too, redacted as ``failure`` is
    (``ProviderApi._redacted``). Anything else behind a ``*_BASE_URL`` (a gateway, a proxy, an
    engine) may put any text there (OpenRouter's guardrail 403, in Anthropic's
    permission_error envelope, quotes its judgement of the input): identifiers only."""
    said = identifiers(failure)
    if hosted and failure.from_provider and failure.status in _ABOUT_OUR_KEY and failure.message:
        said += f": {failure.message}"
    return said


def identifiers(failure: Failure) -> str:
    """What a line above DEBUG, or a span, says of a provider's refusal: its HTTP status, error
    type, ``code`` and ``param`` (each a short identifier), never its message, which may quote
    the request (OpenAI's 400 naming the bad content, a vLLM or llama.cpp parse error repeating
    the prompt): that is at DEBUG only (``provider_said``). A failure not the provider's (a
    connection lost, our own) is its type and message, our words."""
    if not failure.from_provider:
        return f"{failure.error_type}: {failure.message}"
    said = f"{failure.status} {failure.error_type}" if failure.status else failure.error_type
    if failure.code and failure.code != failure.error_type:
        said += f", code {failure.code}"
    if failure.param:
        said += f", param {failure.param}"
    return said


def provider_said(backend: str, model: str, failure: Failure) -> None:
    """The provider's own message of ``failure`` (redacted), at DEBUG: it may quote the request,
    so no line above DEBUG holds it (``identifiers``). The line that follows it (the refusal's,
    the retry's, the break's) names the provider's id of the call."""
    if failure.from_provider and failure.message:
        log.debug(
            "%s said of %s (%s): %s",
            backend,
            model,
            identifiers(failure),
            failure.message,
        )


def _identifier(value: object) -> str:
    """``value`` as a short identifier (vLLM's code may be an int), else empty: a type or code
    that is anything else (words, a long text, a key) is not taken in."""
    if value is None or isinstance(value, bool):
        return ""
    text = str(value)
    return text if _IDENTIFIER.fullmatch(text) else ""


def _retry_after(headers: Any) -> float | None:
    """``retry-after-ms``, else ``retry-after`` in seconds or as an HTTP date (none: the
    message's words may say it, ``_wait_in_words``)."""
    try:
        if (ms := headers.get("retry-after-ms")) is not None:
            return max(0.0, float(ms) / 1000)
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, AttributeError):
        return None


# a rate limit's wait in its message, when no header says it: OpenAI's "... Please try again in
# 41.724s." (also "in 257ms", "in 6m0s", "in 1m12.5s": Go's durations), Groq's the same
_TRY_AGAIN_IN = re.compile(r"\btry again in ((?:\d+(?:\.\d+)?(?:ms|h|m|s))+)(?![A-Za-z])")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _wait_in_words(kind: Kind, message: str) -> float | None:
    """A retried failure's wait as its message words it ("Please try again in 2.5s"), else
    None. OpenAI's rate limits say their wait so, with no ``retry-after`` header to say it:
    before, such a 429 was retried after the backoff alone (50 ms to 8 s), each retry refused
    again while the minute's limit held, and the caller told the backoff's wait, not
    OpenAI's."""
    if kind != Kind.RETRY or (found := _TRY_AGAIN_IN.search(message)) is None:
        return None
    return sum(float(n) * _UNIT_S[unit] for n, unit in _DURATION_PART.findall(found[1]))


def broke_off(failure: Failure) -> str:
    """What a caller is told of a stream broken mid-answer by ``failure`` (the router's "broke
    off" refusal names it), once redacted: a provider's error in our words, its status, its
    error's type and the wait it asked for, never its message (OpenAI's rate limits name the
    operator's organization and the account's use this minute, Anthropic's its organization
    and workspace; the replica's DEBUG line keeps that message, ids redacted); a lost
    connection's or our own failure's type and message."""
    if not failure.from_provider:
        return f"{failure.error_type}: {failure.message}"
    told = failure.error_type or "error"
    if failure.status >= 400:  # (an error event in a stream has its answer's 200)
        told += f" ({failure.status})"
    wait = whole_seconds(failure.retry_after_s)
    if wait is not None:
        told += f", retry after {wait} s"
    return told


def whole_seconds(wait_s: float | None) -> int | None:
    """A provider's ``retry-after`` in whole seconds (rounded up), None for none (or none to
    wait): the wait the router and the HTTP front pass on to the caller."""
    if wait_s is None or not wait_s > 0 or not math.isfinite(wait_s):
        return None
    return math.ceil(wait_s)
