"""Keeps a credential out of every message a provider adapter writes or returns.

A provider's error body may echo the key it was sent (OpenAI's 401 says "Incorrect API key
provided: sk-ab...xyz"); every text leaving the adapter passes ``Redactor.clean``.
"""

from __future__ import annotations

import re

# a key-shaped token, whole or masked with '*' or '...' as providers print them
_KEY_SHAPED = re.compile(r"\b(?:sk|key|api)[-_][A-Za-z0-9_\-*.]{6,}", re.IGNORECASE)
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
