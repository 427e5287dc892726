"""The Admin API's credential: its own token, never an API key, never logged.

It comes from ``CACHEMESH_ADMIN_TOKEN_FILE`` (a file holding it: a mounted secret, preferred)
or ``CACHEMESH_ADMIN_TOKEN``, not both, checked at start-up: at least 16 characters of
printable ASCII (what gRPC metadata carries) on one line, and not the internal credential
(``CACHEMESH_INTERNAL_TOKEN``, which every service holds: the same value let any service, or
whoever read one's secret, open the Admin API). Neither set: the Admin API is off (each call is
refused saying how to turn it on).
Callers present it as ``authorization: Bearer <token>``; the comparison is of the two SHA-256
digests with ``hmac.compare_digest``, so its time tells nothing of the token or its length.

A call refused for its credential (``AuthFailures``) is counted by reason
(``cachemesh_router_admin_auth_failures_total``) and logged at WARNING with the caller's
address and the method, never the token nor a piece of it: at most one line every
``AUTH_FAILED_LOG_EVERY_MS`` a reason, saying how many were not logged (a brute force would
otherwise be a line a guess), the first at once.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable
from typing import Literal

from services.common.auth import INTERNAL_TOKEN
from services.common.clock import SecondsClock, Throttles, suppressed
from services.common.env import ConfigError, Env

log = logging.getLogger("cachemesh.admin")

TOKEN_VAR = "CACHEMESH_ADMIN_TOKEN"
FILE_VAR = "CACHEMESH_ADMIN_TOKEN_FILE"
MIN_LENGTH = 16
AUTH_FAILED_LOG_EVERY_MS = 10_000
# why a call's credential was refused (``cachemesh_router_admin_auth_failures_total``'s reason)
Reason = Literal["missing", "wrong", "ambiguous"]
REASONS: tuple[Reason, ...] = ("missing", "wrong", "ambiguous")
_SAID: dict[Reason, str] = {
    "missing": "no admin token (no 'authorization: Bearer' header)",
    "wrong": "a wrong admin token",
    "ambiguous": "more than one authorization header",
}


class AdminCredential:
    def __init__(self, token: str) -> None:
        # what gRPC metadata can carry (``cachemesh._auth.bearer_metadata`` sends nothing
        # else): a token with an accented letter or a byte-order mark was accepted here, and
        # then no client could ever present it (every Admin call UNAUTHENTICATED)
        if len(token) < MIN_LENGTH or not all("!" <= c <= "~" for c in token):
            raise ConfigError(
                f"the admin token ({FILE_VAR} or {TOKEN_VAR}) must be at least {MIN_LENGTH} "
                "characters of printable ASCII, no whitespace (the value is not shown)"
            )
        self._digest = hashlib.sha256(token.encode()).digest()

    def matches(self, presented: str | None) -> bool:
        offered = hashlib.sha256((presented or "").encode()).digest()
        return hmac.compare_digest(offered, self._digest) and presented is not None

    def __repr__(self) -> str:
        return "AdminCredential('[redacted]')"


def admin_credential_from_env(env: Env, internal_token: str) -> AdminCredential | None:
    """From ``CACHEMESH_ADMIN_TOKEN_FILE`` or ``CACHEMESH_ADMIN_TOKEN`` (``Env.secret``: not
    both; a missing, unreadable or empty file stops the start naming the variable); one equal
    to ``internal_token`` (the services' shared credential) stops it too, naming both
    variables, never the value."""
    token = env.secret(TOKEN_VAR)
    if token is None:
        return None
    credential = AdminCredential(token)
    if credential.matches(internal_token):
        raise ConfigError(
            f"the admin token ({FILE_VAR} or {TOKEN_VAR}) must differ from the internal "
            f"credential ({INTERNAL_TOKEN}_FILE or {INTERNAL_TOKEN}): every service holds the "
            "internal one, so with the same value any of them (or whoever reads its secret) "
            "could call the Admin API. Give the admin token a value of its own (the values "
            "are not shown)"
        )
    return credential


class AuthFailures:
    """Admin calls refused for their credential: each counted (``counted``, by reason) and
    logged at WARNING naming the caller's address and the method (never the token), at most
    one line every ``AUTH_FAILED_LOG_EVERY_MS`` a reason (``clock``: seconds, monotonic)."""

    def __init__(self, clock: Callable[[], float], counted: Callable[[Reason], None]) -> None:
        self._lines = Throttles(SecondsClock(clock), AUTH_FAILED_LOG_EVERY_MS)
        self._counted = counted

    def failed(self, reason: Reason, method: str, peer: str) -> None:
        self._counted(reason)
        due = self._lines.due(reason)
        if due:
            log.warning(
                "admin: %s refused UNAUTHENTICATED: %s, from %s%s",
                method,
                _SAID[reason],
                peer,
                suppressed(due, AUTH_FAILED_LOG_EVERY_MS),
            )
