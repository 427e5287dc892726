"""Keeps a credential out of every message a provider adapter writes or returns.

A provider's error body may echo the key it was sent (OpenAI's 401 says "Incorrect API key
provided: sk-ab...xyz"); every text leaving the adapter passes ``Redactor.clean``. The HTTP
stack logs request URLs whole, a base URL's ``user:password@`` included: ``UrlFilter`` shows
them as ``redacted_url`` does.
"""

from __future__ import annotations

import logging
import re

from services.common.env import redacted_url

# a key-shaped token, whole or masked with '*' or '...' as providers print them
_KEY_SHAPED = re.compile(r"\b(?:sk|key|api)[-_][A-Za-z0-9_\-*.]{6,}", re.IGNORECASE)
# a URL as a log line shows it: up to a space, a quote or an angle bracket
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>]+")
REDACTED = "[redacted]"
MAX_MESSAGE_CHARS = 500


class Redactor:
    def __init__(self, secrets: list[str]) -> None:
        self._secrets = [s for s in secrets if s]

    def clean(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
            if len(secret) >= 12:  # a key shown by its head or tail
                text = text.replace(secret[:8], REDACTED).replace(secret[-6:], REDACTED)
        return _KEY_SHAPED.sub(REDACTED, text)

    def message(self, text: str) -> str:
        """``clean``, and cut to a length an error message may have."""
        text = self.clean(text)
        if len(text) > MAX_MESSAGE_CHARS:
            text = text[:MAX_MESSAGE_CHARS] + "..."
        return text


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
