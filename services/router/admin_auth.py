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
``AUTH_FAILED_LOG_EVERY_MS`` a reason and caller's host (the peer's address without its
port), saying how many were not logged (a brute force would otherwise be a line a guess), the
first at once. Up to ``AUTH_FAILED_HOSTS`` hosts are tracked a reason (one that has not
failed for a window gives its place to a new one); the failures from the others share one line an
interval, which says how many addresses they came from. Before, the line was throttled by
reason alone: a misconfigured client failing once a window took each window's line, and a
brute force from another address (1,503 failures) was never named in any. Behind an L7 proxy
(a load balancer ending TLS) the peer is the proxy, so its lines name the proxy.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from services.common.auth import INTERNAL_TOKEN
from services.common.clock import SecondsClock, Throttle, suppressed
from services.common.env import ConfigError, Env

log = logging.getLogger("cachemesh.admin")

TOKEN_VAR = "CACHEMESH_ADMIN_TOKEN"
FILE_VAR = "CACHEMESH_ADMIN_TOKEN_FILE"
MIN_LENGTH = 16
AUTH_FAILED_LOG_EVERY_MS = 10_000
# the callers' hosts a reason's lines are throttled by, each its own; beyond, one line for all
AUTH_FAILED_HOSTS = 32
# the most distinct addresses counted for the line of the hosts beyond those (then "at least")
AUTH_FAILED_OTHER_ADDRESSES = 1024
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


def peer_host(peer: str) -> str:
    """A gRPC peer (``ipv4:10.0.0.9:40000``, ``ipv6:[::1]:5000``) without its port: a
    caller's connections come from many ports. Another form (``unix:...``) as it is."""
    if peer.startswith("ipv6:[") and "]" in peer:
        return peer[: peer.index("]") + 1]
    if peer.startswith("ipv4:") and peer.count(":") == 2:
        return peer.rsplit(":", 1)[0]
    return peer


@dataclass
class _Window:
    """The failures of one reason from one host (or from the hosts beyond those tracked) since
    its last line."""

    throttle: Throttle  # its lines: the first at once, then at most one a window
    seen_ms: int = 0  # its last failure's time
    hosts: set[str] = field(default_factory=set)  # their distinct hosts (the others' line)


class AuthFailures:
    """Admin calls refused for their credential: each counted (``counted``, by reason) and
    logged at WARNING naming the caller's address and the method (never the token), at most
    one line every ``AUTH_FAILED_LOG_EVERY_MS`` a reason and host, for up to
    ``AUTH_FAILED_HOSTS`` hosts a reason, and one for the hosts beyond them (``clock``:
    seconds, monotonic)."""

    def __init__(self, clock: Callable[[], float], counted: Callable[[Reason], None]) -> None:
        self._clock = SecondsClock(clock)
        self._counted = counted
        # a reason's tracked hosts, the least recently failed first
        self._hosts: dict[Reason, OrderedDict[str, _Window]] = {r: OrderedDict() for r in REASONS}
        self._others: dict[Reason, _Window] = {r: self._window() for r in REASONS}

    def _window(self) -> _Window:
        return _Window(Throttle(self._clock, AUTH_FAILED_LOG_EVERY_MS))

    def failed(self, reason: Reason, method: str, peer: str) -> None:
        self._counted(reason)
        now = self._clock.now_ms()
        host = peer_host(peer)
        hosts = self._hosts[reason]
        window = hosts.get(host)
        if window is None and self._room(hosts, now):
            window = hosts[host] = self._window()
        if window is not None:
            hosts.move_to_end(host)
        else:
            window = self._others[reason]
            if len(window.hosts) < AUTH_FAILED_OTHER_ADDRESSES:
                window.hosts.add(host)
        window.seen_ms = now
        due = window.throttle.due()
        if not due:
            return
        addresses = len(window.hosts)
        window.hosts.clear()
        beyond = window is self._others[reason]
        log.warning(
            "admin: %s refused UNAUTHENTICATED: %s, from %s%s",
            method,
            _SAID[reason],
            peer,
            _suppressed(due, addresses, beyond),
        )

    @staticmethod
    def _room(hosts: OrderedDict[str, _Window], now: int) -> bool:
        """Whether a new host can be tracked: fewer than ``AUTH_FAILED_HOSTS`` are, or the
        least recently failed one has not failed for a window (it gives its place, its count
        of failures not logged dropped as a throttled line's is when no failure follows; it
        is counted in the metric; failing again, it is logged at once, as a new host is)."""
        if len(hosts) < AUTH_FAILED_HOSTS:
            return True
        oldest, window = next(iter(hosts.items()))
        if now - window.seen_ms < AUTH_FAILED_LOG_EVERY_MS:
            return False
        del hosts[oldest]
        return True


def _suppressed(due: int, addresses: int, beyond: bool) -> str:
    """What a line adds: for a tracked host, how many of its failures were not logged; for
    the hosts beyond them, also from how many distinct addresses (hosts) they and it came."""
    if not beyond:
        return suppressed(due, AUTH_FAILED_LOG_EVERY_MS)
    every = f"{AUTH_FAILED_LOG_EVERY_MS / 1000:g}"
    if due <= 1:
        return f" (an address beyond the {AUTH_FAILED_HOSTS} tracked)"
    many = f"{addresses:,}"
    if addresses >= AUTH_FAILED_OTHER_ADDRESSES:
        many = f"at least {many}"
    return (
        f" ({due - 1} more since the last such line from the addresses beyond the "
        f"{AUTH_FAILED_HOSTS} tracked, not logged, {many} distinct with this one: one line a "
        f"{every} s)"
    )
