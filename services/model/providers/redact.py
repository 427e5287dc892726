"""Keeps a credential, and the ids of the operator's provider account, out of every message a
provider adapter writes or returns.

A provider's error body may echo the key it was sent (OpenAI's 401 says "Incorrect API key
provided: sk-ab...xyz"); every text leaving the adapter passes ``Redactor.clean``, which takes
out a key whole, by its head or tail, masked ("sk-proj-AbCd****xYzQ", "abcd...mnop") or
key-shaped, with the rest of the run of key characters it is in; and the account's ids a
provider names in its messages (``_ACCOUNT_ID``: OpenAI's rate limits name the organization,
"org-...", its 403s the project, "proj_..."; Anthropic's the organization by its UUID and
the workspace, "wrkspc_..."), which are the operator's, not a tenant's to read. The HTTP
stack logs request URLs whole, a base URL's ``user:password@`` included: ``UrlFilter`` shows
them as ``redacted_url`` does.
"""

from __future__ import annotations

import logging
import re

from services.common.env import redacted_url

# a key-shaped token, whole or masked with '*' or '...' as providers print them: one of the
# providers' key prefixes (sk-, sk-ant-, sk-proj-), or key-/api- and a key-like run
# (``_key_like``). Before, any key_ / api_ word of 6+ characters: a 400 naming the caller's own
# schema field ('api_version', 'key_points') lost it
_KEY_SHAPED = re.compile(r"\b(?:sk|key|api)[-_][A-Za-z0-9_\-*.]{6,}", re.IGNORECASE)
_KNOWN_KEY_PREFIX = re.compile(r"sk-", re.IGNORECASE)
# a key's run after its key-/api- prefix: this long, letters and digits mixed (or masked)
_KEY_LIKE_CHARS = 20
# an id of the operator's provider account as a provider's message names it: OpenAI's
# organization and project, Anthropic's workspace; the ``id`` group of ``_NAMED_ACCOUNT_ID``
# where the provider's phrasing names the account: a UUID after "organization" (Anthropic's
# "for your organization (<uuid>)"), "workspace" or Azure's "/subscriptions/", a user- id
# after "user" (OpenAI's). Before, any UUID and user- id: a 400 naming the caller's own
# tool_use_id or metadata.user_id lost it
_ACCOUNT_ID = re.compile(r"\borg-[A-Za-z0-9]{16,}|\b(?:proj|wrkspc)_[A-Za-z0-9]{16,}")
_UUID = r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}\b"
_NAMED_ACCOUNT_ID = re.compile(
    rf"\b(?:organization|workspace|subscriptions)(?:[ _]?id)?[\s:(/`'\"]{{1,3}}(?P<id>{_UUID})"
    r"|\buser[\s:(`'\"]{1,3}(?P<user>user-[A-Za-z0-9]{16,})",
    re.IGNORECASE,
)
# a run of the characters a key or its masked form is made of: what is redacted whole once
# any of it shows a key. Both runs are looked at: a base64-style key (a proxy's or an
# engine's, "Zm9v+YmFy/YmF6...") is split at '+', '/' and '=' by the first, and its head
# "Zm9v+YmFy/YmF6cXV4..." reached the 401/403 ERROR line (18 of its 28 characters); the
# second alone would miss a masked key after a '=' or '/' ("key=abcd...mnop": its head is
# not "key=abcd")
_TOKENS = (re.compile(r"[A-Za-z0-9_\-*.\u2026]+"), re.compile(r"[A-Za-z0-9_\-*.\u2026+/=]+"))
# the mask in a key shown by its head and tail: "sk-proj-AbCd****xYzQ", "abcd...mnop"
_MASK = re.compile(r"\*+|\.{2,}|\u2026")
# a masked form shows at least this much of the key (its head and tail together)
_MASKED_SHOWS = 4
# a secret this long may be shown in part: by its head (8 characters) or tail (6)
_SHOWN_IN_PART = 12
# a URL as a log line shows it: up to a space, a quote or an angle bracket
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>]+")
REDACTED = "[redacted]"
MAX_MESSAGE_CHARS = 500


class Redactor:
    def __init__(self, secrets: list[str]) -> None:
        self._secrets = [s for s in secrets if s]
        self._partial = [s for s in self._secrets if len(s) >= _SHOWN_IN_PART]

    def clean(self, text: str) -> str:
        """``text`` without a secret, whole, by its head or tail, masked, or key-shaped, and
        without an id of the provider account (``_ACCOUNT_ID``). Each
        rule marks what it finds in the text as given, and the marks are replaced together:
        no rule's replacement hides a key from another (replacing a key's head first turned
        ``sk-proj-AbCd****xYzQ`` into ``[redacted]AbCd****xYzQ``, no longer key-shaped)."""
        whole = [m.span() for s in self._secrets for m in re.finditer(re.escape(s), text)]
        spans = whole + [m.span() for m in _KEY_SHAPED.finditer(text) if _key_like(m[0])]
        spans += [m.span() for m in _ACCOUNT_ID.finditer(text)]
        spans += [m.span(m.lastgroup or 0) for m in _NAMED_ACCOUNT_ID.finditer(text)]
        if self._partial:
            # a run around a whole key is not taken with it ("forbidden_for_<key>" keeps its
            # words): the key alone is
            rest = _blanked(text, whole)
            spans += [
                m.span()
                for token in _TOKENS
                for m in token.finditer(rest)
                if self._shows_a_key(m[0])
            ]
        return _marked_out(text, spans)

    def _shows_a_key(self, token: str) -> bool:
        """A run of key characters holding a secret's head or tail, or its masked form (its
        head and tail around '*' or '...')."""
        masks = list(_MASK.finditer(token))
        head = token[: masks[0].start()] if masks else ""
        tail = token[masks[-1].end() :].rstrip(".") if masks else ""  # (a sentence's end)
        for secret in self._partial:
            if secret[:8] in token or secret[-6:] in token:
                return True
            if (
                masks
                and len(head) + len(tail) >= _MASKED_SHOWS
                and secret.startswith(head)
                and secret.endswith(tail)
            ):
                return True
        return False

    def message(self, text: str) -> str:
        """``clean``, and cut to a length an error message may have."""
        text = self.clean(text)
        if len(text) > MAX_MESSAGE_CHARS:
            text = text[:MAX_MESSAGE_CHARS] + "..."
        return text


def _key_like(token: str) -> bool:
    """A ``_KEY_SHAPED`` token that is a key: a provider's key prefix (sk-), or a masked key
    ('*', '...'), or a run of ``_KEY_LIKE_CHARS`` or more after its prefix with letters and
    digits mixed; not a word such as a schema's field name ('api_version')."""
    if _KNOWN_KEY_PREFIX.match(token) or _MASK.search(token[4:]):
        return True
    run = token[4:].rstrip(".")
    letters, digits = any(c.isalpha() for c in run), any(c.isdigit() for c in run)
    return len(run) >= _KEY_LIKE_CHARS and letters and digits


def _blanked(text: str, spans: list[tuple[int, int]]) -> str:
    """``text`` with ``spans`` blanked out, each character a NUL: no run of key characters
    goes across one; the others stay where they were."""
    chars = list(text)
    for start, end in spans:
        chars[start:end] = "\0" * (end - start)
    return "".join(chars)


def _marked_out(text: str, spans: list[tuple[int, int]]) -> str:
    """``text`` with each run of overlapping or touching ``spans`` replaced by one REDACTED."""
    if not spans:
        return text
    parts: list[str] = []
    at = 0
    start, end = -1, -1
    for span_start, span_end in sorted(spans):
        if span_start <= end:  # overlaps or touches the run: extends it
            end = max(end, span_end)
            continue
        if end >= 0:
            parts += (text[at:start], REDACTED)
            at = end
        start, end = span_start, span_end
    parts += (text[at:start], REDACTED, text[end:])
    return "".join(parts)


class UrlFilter(logging.Filter):
    """Rewrites a record whose message holds a URL with credentials (``user:password@``, a
    token as ``token@``) to show that URL as ``redacted_url`` does. On a library's logger
    (it sees that logger's own records, not its children's)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a record that cannot be formatted: logging reports it itself
            return True
        if "@" in message:
            cleaned = _URL.sub(
                lambda url: redacted_url(url[0]) if "@" in url[0] else url[0], message
            )
            if cleaned != message:
                record.msg, record.args = cleaned, None
        return True
